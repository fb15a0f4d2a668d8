"""The fast selective scan against its float64 reference twin: outputs and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_mamba.nn.selective_scan import selective_scan, selective_scan_reference

TOL = 1e-5
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def rel_err(a, b):
    """max|a - b| / max|b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_inputs(b, d, n, L, seed=0, D=True, z=True, delta_bias=True, delta_softplus=True):
    """Random float32 inputs in mamba-ssm's layout, like mamba-ssm's own scan tests."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x = {
        "u": rnd(b, d, L),
        # without softplus, dt = delta (+ bias) must stay positive
        "delta": rnd(b, d, L) * 0.5 if delta_softplus else 0.5 * torch.rand(b, d, L, generator=g),
        "A": -0.5 - torch.rand(d, n, generator=g),
        "B": rnd(b, n, L),
        "C": rnd(b, n, L),
        "D": rnd(d) if D else None,
        "z": rnd(b, d, L) if z else None,
        "delta_bias": 0.5 * torch.rand(d, generator=g) if delta_bias else None,
    }
    return x


def compare(x, delta_softplus, tol=TOL, **fast_kwargs):
    """Run both implementations on the same values and assert output and gradients agree."""
    fast_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    ref_in = {k: (v.double().requires_grad_() if v is not None else None) for k, v in x.items()}
    y = selective_scan(**fast_in, delta_softplus=delta_softplus, **fast_kwargs)
    y_ref = selective_scan_reference(**ref_in, delta_softplus=delta_softplus)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, ("out", rel_err(y, y_ref))
    dout = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(dout.float())
    y_ref.backward(dout)
    for k in NAMES:
        if x[k] is None:
            continue
        grad, grad_ref = fast_in[k].grad, ref_in[k].grad
        assert grad is not None and grad.shape == x[k].shape, k
        assert torch.isfinite(grad).all(), k
        assert rel_err(grad, grad_ref) < tol, (k, rel_err(grad, grad_ref))
    return fast_in, y


@pytest.mark.parametrize("L", [1, 7, 64, 65, 130, 200])
def test_lengths(L):
    # Default tuning: for these small sizes the chunk is 64 steps, so 65, 130 and 200 end
    # with a partial chunk.
    compare(make_inputs(2, 4, 3, L, seed=L), delta_softplus=True)


@pytest.mark.parametrize("L", [1, 7, 64, 200])
def test_small_chunks_and_batch_blocks(L):
    # Many chunks (5 does not divide 7, 64 or 200) and one batch row per block.
    compare(make_inputs(3, 4, 3, L, seed=L), delta_softplus=True, chunk_size=5, batch_block=1)


@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("D", [True, False])
@pytest.mark.parametrize("z", [True, False])
@pytest.mark.parametrize("delta_bias", [True, False])
def test_optional_inputs(delta_softplus, D, z, delta_bias):
    x = make_inputs(2, 4, 3, 37, seed=3, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    compare(x, delta_softplus=delta_softplus, chunk_size=8)


def test_realistic_sizes():
    # mamba's A init (-(1..n) per channel) and dt init, several blocks and chunks.
    b, d, n, L = 5, 16, 8, 90
    x = make_inputs(b, d, n, L, seed=7)
    x["A"] = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    dt = torch.exp(torch.rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x["delta_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
    x["delta"] = 0.1 * x["delta"]
    compare(x, delta_softplus=True, chunk_size=16, batch_block=2)


def test_extreme_dt_is_finite():
    # dt from 1e-4 to 1e2 after softplus: decays from ~1 down to exact zeros.
    b, d, n, L = 2, 6, 4, 50
    x = make_inputs(b, d, n, L, seed=11, delta_bias=False)
    x["A"] = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    dt = torch.logspace(-4, 2, b * d * L).reshape(b, d, L)
    dt = dt.flatten()[torch.randperm(dt.numel(), generator=torch.Generator().manual_seed(0))].reshape(b, d, L)
    x["delta"] = torch.where(dt > 20, dt, torch.log(torch.expm1(dt)))  # softplus^-1(dt)
    assert torch.allclose(F.softplus(x["delta"]), dt, rtol=1e-5)
    fast_in, y = compare(x, delta_softplus=True, chunk_size=8)
    assert torch.isfinite(y).all()


def test_non_contiguous_inputs_and_last_state():
    # The Mamba mixer passes transposed views of (batch, L, d) tensors.
    b, d, n, L = 2, 4, 3, 21
    x = make_inputs(b, d, n, L, seed=5)
    for k in ("u", "delta", "z", "B", "C"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        assert not x[k].is_contiguous()
    compare(x, delta_softplus=True, chunk_size=4)
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, chunk_size=4)
    y_ref, last_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                               return_last_state=True)
    assert last.shape == (b, d, n)
    assert rel_err(last, last_ref) < TOL


def test_saved_memory_is_bounded():
    # Only chunk starting states are kept: far less than the (L, b, d, n) state history.
    b, d, n, L = 1, 64, 64, 4096
    x = make_inputs(b, d, n, L, seed=2)
    x = {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**x, delta_softplus=True)
    state_history = L * b * d * n * 4
    assert sum(saved) < 0.25 * state_history, (sum(saved), state_history)


def test_bf16_autocast_smoke():
    b, d, n, L = 2, 8, 4, 40
    x = make_inputs(b, d, n, L, seed=9)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        # u comes out of a bf16 matmul, as it would from the in-projection.
        u = torch.matmul(leaves["u"].transpose(1, 2), torch.eye(d)).transpose(1, 2)
        assert u.dtype == torch.bfloat16
        y = selective_scan(u, *(leaves[k] for k in NAMES[1:]), delta_softplus=True, chunk_size=16)
    assert y.dtype == torch.bfloat16
    y32 = selective_scan(**x, delta_softplus=True)
    assert rel_err(y.float(), y32) < 2e-2  # only u was rounded to bf16
    y.float().square().sum().backward()
    for k in NAMES:
        assert leaves[k].grad is not None and leaves[k].grad.dtype == torch.float32, k
        assert torch.isfinite(leaves[k].grad).all(), k
