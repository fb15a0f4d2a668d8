"""Numerics of the torch backend: extreme dt, the overflow guard, and bf16 autocast training.

``train_with_bf16_autocast`` is shared with tests/test_gpu_numerics.py, which runs it on a GPU at
length 2,048 for 200 steps; here it runs briefly on the CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_mamba.nn.mamba_mixer import MambaMixer
from recbole_mamba.nn.selective_scan import selective_scan, selective_scan_reference
from tests.test_mamba4rec import batch, build


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def mixer_with_dt_range(dt_min, dt_max, d_model=16, d_state=16, seed=0):
    """A Mamba block whose channels have fixed dt from dt_min to dt_max (log-spaced), and A from -1
    to -d_state (the S4D initialisation), so that dt * A spans dt_min to d_state * dt_max."""
    torch.manual_seed(seed)
    mixer = MambaMixer(d_model, d_state=d_state, d_conv=4, expand=2, backend="torch")
    dt = torch.logspace(math.log10(dt_min), math.log10(dt_max), mixer.d_inner)
    with torch.no_grad():
        mixer.dt_proj.weight.zero_()  # dt no longer depends on the input: exactly the chosen values
        mixer.dt_proj.bias.copy_(torch.where(dt > 20, dt, torch.log(torch.expm1(dt))))  # softplus^-1
    assert torch.allclose(F.softplus(mixer.dt_proj.bias), dt, rtol=1e-4)
    return mixer


def reference_block(mixer, x):
    """The Mamba block written out in float64 from ``mixer``'s parameters, with the per-step
    reference scan. Returns (output, {name: float64 leaf}) so gradients can be compared."""
    p = {name: t.detach().double().requires_grad_(True) for name, t in mixer.named_parameters()}
    length, d_conv = x.shape[1], mixer.conv1d.kernel_size[0]
    xz = (x @ p["in_proj.weight"].T).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    u = F.silu(F.conv1d(u, p["conv1d.weight"], p["conv1d.bias"], padding=d_conv - 1, groups=u.shape[1])[..., :length])
    dt, B, C = torch.split(u.transpose(1, 2) @ p["x_proj.weight"].T, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    y = selective_scan_reference(
        u, (dt @ p["dt_proj.weight"].T).transpose(1, 2), -torch.exp(p["A_log"]), B.transpose(1, 2),
        C.transpose(1, 2), p["D"], z=z, delta_bias=p["dt_proj.bias"], delta_softplus=True,
    )
    return y.transpose(1, 2) @ p["out_proj.weight"].T, p


def test_extreme_dt_in_the_mixer_is_finite_and_matches_the_float64_twin():
    # dt from 1e-4 (decay ~1: the state keeps everything) to 1e2 (decay exp(-1600): exactly 0).
    mixer = mixer_with_dt_range(1e-4, 1e2)
    x = torch.randn(3, 80, 16, generator=torch.Generator().manual_seed(1)) * 3
    grad_out = torch.randn(3, 80, 16, generator=torch.Generator().manual_seed(2))

    x_fast = x.clone().requires_grad_(True)
    y = mixer(x_fast)
    y.backward(grad_out)
    x_ref = x.double().requires_grad_(True)
    y_ref, reference_params = reference_block(mixer, x_ref)
    y_ref.backward(grad_out.double())

    assert torch.isfinite(y).all() and torch.isfinite(x_fast.grad).all()
    assert relative_error(y, y_ref) < 1e-5  # float32 against float64: ~3e-7 measured
    assert relative_error(x_fast.grad, x_ref.grad) < 1e-5
    for name, p in mixer.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert relative_error(p.grad, reference_params[name].grad) < 1e-5, name


@pytest.mark.parametrize("dt", [1e-4, 1e-2, 1.0, 1e2])
def test_every_dt_decade_alone_is_finite(dt):
    mixer = mixer_with_dt_range(dt, dt)
    x = torch.randn(2, 50, 16, requires_grad=True)
    y = mixer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


def scan_inputs(b=2, d=4, n=3, L=9):
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(b, d, L, generator=g), delta=torch.rand(b, d, L, generator=g),
                A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, n, L, generator=g),
                C=torch.randn(b, n, L, generator=g))


def test_inputs_that_would_overflow_exp_are_refused():
    x = scan_inputs()
    # What the guard prevents: with A > 0 the decay exp(dt * A) overflows and the output is inf/nan.
    overflowing = {**x, "A": -x["A"] * 1e3}
    assert not torch.isfinite(selective_scan_reference(**overflowing, delta_softplus=True)).all()
    with pytest.raises(ValueError, match="A must be finite and <= 0"):
        selective_scan(**overflowing, delta_softplus=True)
    with pytest.raises(ValueError, match="A must be finite"):
        selective_scan(**{**x, "A": torch.full_like(x["A"], -math.inf)}, delta_softplus=True)
    with pytest.raises(ValueError, match="delta .* must be >= 0"):
        selective_scan(**{**x, "delta": x["delta"] - 2}, delta_softplus=False)
    # Softplus makes any delta safe; so does a bias that lifts dt above 0.
    assert torch.isfinite(selective_scan(**{**x, "delta": x["delta"] * 1e3 - 500}, delta_softplus=True)).all()
    lifted = {**x, "delta": x["delta"] - 0.5, "delta_bias": torch.ones(4)}
    assert torch.isfinite(selective_scan(**lifted, delta_softplus=False)).all()


def train_with_bf16_autocast(device, backend, length, steps, batch_size=4, n_items=500, num_layers=2, seed=0):
    """Train Mamba4Rec with bf16 autocast and Adam; assert loss, gradients and parameters stay finite
    at every step. Returns the losses."""
    torch.manual_seed(seed)
    model, _ = build(n_items=n_items, mamba_backend=backend, num_layers=num_layers, MAX_ITEM_LIST_LENGTH=length)
    model = model.to(device).train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        items = torch.randint(1, n_items, (batch_size, length), generator=generator)
        target = (items[:, -1] * 7 + 3) % (n_items - 1) + 1  # a rule the model can learn
        interaction = batch(model, items.to(device), torch.full((batch_size,), length, device=device),
                            **{model.POS_ITEM_ID: target.to(device)})
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            loss = model.calculate_loss(interaction)
        assert torch.isfinite(loss), (step, loss)
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (step, name)
        optimizer.step()
        losses.append(loss.item())
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert any(not torch.equal(p.detach(), initial[name]) for name, p in model.named_parameters())
    return losses


def test_bf16_autocast_training_on_the_cpu_stays_finite():
    losses = train_with_bf16_autocast("cpu", "torch", length=64, steps=12)
    assert len(losses) == 12
