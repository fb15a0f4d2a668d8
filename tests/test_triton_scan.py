"""The Triton selective scan against its float64 reference twin: outputs and every gradient.

On a GPU the kernels run compiled, at the lengths the issue names (1 to 8192). Without a GPU they run
through Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU), which executes the same
kernel code step by step: slow, so only small shapes. Skipped where Triton is not installed.
"""

import os

import pytest
import torch

from recbole_mamba.nn.selective_scan import selective_scan_reference
from tests.test_selective_scan import NAMES, make_inputs, rel_err

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before the kernels are defined (at import of the module below).
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton_scan = pytest.importorskip("recbole_mamba.nn.triton_scan", reason="needs triton")

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = 1e-5


def compare(x, delta_softplus=True, tol=TOL, grad_tol=None, dtype=torch.float32, **kwargs):
    """Triton scan vs the float64 reference on the same values: output and all gradients."""
    def cast(k, v):  # the sequence tensors in ``dtype``; parameters stay float32
        return v.to(DEVICE, dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).clone()

    fast_in = {k: cast(k, v).requires_grad_() if v is not None else None for k, v in x.items()}
    ref_in = {k: cast(k, v).double().requires_grad_() if v is not None else None for k, v in x.items()}
    y = triton_scan.selective_scan_triton(**fast_in, delta_softplus=delta_softplus, **kwargs)
    y_ref = selective_scan_reference(**ref_in, delta_softplus=delta_softplus)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, ("out", rel_err(y, y_ref))
    dout = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    y.backward(dout.to(dtype))
    y_ref.backward(dout.to(dtype).double())
    for k in NAMES:
        if x[k] is None:
            continue
        grad, grad_ref = fast_in[k].grad, ref_in[k].grad
        assert grad is not None and grad.shape == x[k].shape and grad.dtype == fast_in[k].dtype, k
        assert torch.isfinite(grad).all(), k
        assert rel_err(grad, grad_ref) < (grad_tol or tol), (k, rel_err(grad, grad_ref))
    return fast_in, y


GPU_LENGTHS = [1, 7, 200, 2048, 8192]
CPU_LENGTHS = [1, 7, 37]


@pytest.mark.parametrize("L", GPU_LENGTHS if ON_GPU else CPU_LENGTHS)
def test_lengths(L):
    # Recommendation shapes on the GPU (d_inner 128, d_state 32); a tiny one in the interpreter.
    b, d, n = (2, 128, 32) if ON_GPU else (2, 5, 3)
    compare(make_inputs(b, d, n, L))


@pytest.mark.parametrize("d,n", [(256, 16), (64, 64), (96, 8)] if ON_GPU else [(3, 8), (17, 2)])
def test_widths_and_state_sizes(d, n):
    compare(make_inputs(3, d, n, 200 if ON_GPU else 19))


@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("D,z,delta_bias", [(True, True, True), (False, False, False), (True, False, True)])
def test_optional_inputs(delta_softplus, D, z, delta_bias):
    x = make_inputs(2, 6, 4, 23, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    compare(x, delta_softplus=delta_softplus)


@pytest.mark.parametrize("config", [(1, 1, 1), (2, 4, 1), (8, 8, 2)])
def test_launch_configs_agree(config):
    """Every tiling computes the same scan, including chunks longer than the sequence."""
    compare(make_inputs(2, 5, 4, 11), config=config)


@pytest.mark.parametrize("L,config,D,z", [(19, (2, 4, 1, 3), True, True), (19, (4, 2, 1, 5), False, False),
                                          (11, (8, 1, 1, 11), True, True)])
def test_time_segments_agree(L, config, D, z):
    """A sequence split into segments (uneven ones: 2 + 2 + 1 chunks; one step each) gives the same
    scan, last state included."""
    x = make_inputs(2, 5, 4, L, D=D, z=z)
    compare(x, config=config)
    args = {k: v.to(DEVICE) if v is not None else None for k, v in x.items()}
    _, last = triton_scan.selective_scan_triton(**args, delta_softplus=True, return_last_state=True, config=config)
    _, last_ref = selective_scan_reference(**{k: v.double() if v is not None else None for k, v in args.items()},
                                           delta_softplus=True, return_last_state=True)
    assert rel_err(last, last_ref) < TOL


def test_long_sequences_in_small_batches_get_segments():
    assert triton_scan.launch_config(128, 32, 200, 2048)[:4] == (8, 4, 1, 1)
    block_d, _, _, segments, _, _ = triton_scan.launch_config(128, 32, 8192, 16)
    assert segments > 1 and 16 * (128 // block_d) * segments >= triton_scan.TARGET_PROGRAMS
    assert triton_scan.launch_config(128, 32, 7, 2)[:4] == (4, 4, 1, 1)  # too short to split


def test_forward_takes_wider_tiles_where_the_batch_fills_the_gpu():
    assert triton_scan.launch_config(128, 32, 200, 2048)[4:] == (32, 2)
    assert triton_scan.launch_config(128, 32, 8192, 16)[4:] == (16, 1)
    assert triton_scan.launch_config(128, 64, 200, 2048)[4:] == (8, 1)  # more states: as the backward


@pytest.mark.parametrize("L,config", [(9, (2, 4, 1, 1, 8, 2)), (19, (2, 4, 1, 3, 4, 1)), (11, (8, 1, 1, 11, 2, 1))])
def test_forward_tiling_apart_from_the_backward(L, config):
    """The forward on its own channel blocks and warps (segments and chunks shared with the backward)."""
    compare(make_inputs(2, 5, 4, L), config=config)


@pytest.mark.parametrize("config", [(8, 4), (8, 4, 1, 1, 32), (8, 4, 1, 1, 32, 2, 0)])
def test_configs_of_the_wrong_length_are_refused(config):
    with pytest.raises(ValueError, match="3, 4 or 6 values"):
        triton_scan.selective_scan_triton(**make_inputs(1, 2, 2, 3), config=config)


@pytest.mark.parametrize("scratch_bytes", [1, 600])
def test_backward_in_batch_slices(monkeypatch, scratch_bytes):
    """A scratch budget below the batch's: the backward runs slice by slice (1 row, then 2 + 1 rows)."""
    monkeypatch.setattr(triton_scan, "BACKWARD_SCRATCH_BYTES", scratch_bytes)
    compare(make_inputs(3, 5, 4, 9), config=(2, 4, 1))
    compare(make_inputs(3, 5, 4, 9), config=(2, 2, 1, 2))


def test_small_dt_keeps_precision():
    # softplus of very negative values (dt ~ 1e-4, the smallest Mamba initialises) must not lose digits.
    x = make_inputs(2, 4, 4, 9)
    x["delta"] = x["delta"] - 9.0
    compare(x)


def test_non_contiguous_inputs_and_last_state():
    """The mixer passes transposed views (delta, B, C): strides go to the kernel, no copies needed."""
    b, d, n, L = 2, 6, 4, 11
    x = make_inputs(b, d, n, L)
    x["delta"] = x["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not x["delta"].is_contiguous() and not x["B"].is_contiguous()
    compare(x)
    args = {k: v.to(DEVICE) if v is not None else None for k, v in x.items()}
    y, last = triton_scan.selective_scan_triton(**args, delta_softplus=True, return_last_state=True)
    _, last_ref = selective_scan_reference(**{k: v.double() if v is not None else None for k, v in args.items()},
                                           delta_softplus=True, return_last_state=True)
    assert last.dtype == torch.float32 and rel_err(last, last_ref) < TOL


def test_bfloat16_inputs():
    """bf16 in, bf16 out, float32 arithmetic: only the final rounding to bf16 differs from float64."""
    compare(make_inputs(2, 6, 4, 17), dtype=torch.bfloat16, tol=1e-2, grad_tol=2e-2)


def test_padding_steps_do_not_leak_into_the_state():
    """A length that is not a multiple of the chunk: the last state is the one after step L-1."""
    x = make_inputs(1, 3, 2, 5)
    args = {k: v.to(DEVICE) if v is not None else None for k, v in x.items()}
    _, last = triton_scan.selective_scan_triton(**args, delta_softplus=True, return_last_state=True,
                                                config=(4, 4, 1))
    _, last_ref = selective_scan_reference(**{k: v.double() if v is not None else None for k, v in args.items()},
                                           delta_softplus=True, return_last_state=True)
    assert rel_err(last, last_ref) < TOL
