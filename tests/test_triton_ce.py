"""The Triton cross entropy (``ce_kernel: triton``) against its twin ``F.cross_entropy`` in float64:
the loss and both gradients.

On a GPU the kernels run compiled, at an all-position batch's size; without one, through Triton's
interpreter (``TRITON_INTERPRET=1``, numpy on the CPU), on small shapes. Skipped where Triton is
not installed.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from recbole_mamba.nn import losses

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before the kernels are defined (at import of the module below).
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton_ce = pytest.importorskip("recbole_mamba.nn.triton_ce", reason="needs triton")

DEVICE = "cuda" if ON_GPU else "cpu"


def problem(n, v, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def against_float64(hidden, weight, targets, **kwargs):
    """Relative errors of the loss and both gradients (of 2.5 x loss) against float64; negative
    targets are left out, as F.cross_entropy's ignore_index does."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_ce.linear_cross_entropy(h, w, targets, **kwargs)
    (2.5 * loss).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=-1)
    (2.5 * expected).backward()
    return [float((a.double() - b).abs().max() / b.abs().max()) for a, b in
            ((loss.detach(), expected.detach()), (h.grad, h64.grad), (w.grad, w64.grad))]


SMALL = [(1, 50, 64), (150, 77, 64), (37, 200, 20), (130, 64, 16)]  # odd sizes: partial tiles everywhere
LARGE = [(20000, 5000, 64), (1000, 3707, 64), (64, 1000, 256)] if ON_GPU else []


@pytest.mark.parametrize("n, v, d", SMALL + LARGE)
@pytest.mark.parametrize("precision", triton_ce.PRECISIONS)
def test_matches_float64(n, v, d, precision):
    errors = against_float64(*problem(n, v, d), precision=precision)
    assert max(errors) < 1e-5, errors


def test_launch_config_picks_a_backward_for_every_width():
    for d in (16, 64, 65, 128, 256):
        tilings = triton_ce.launch_config(d)
        assert "forward" in tilings and (("backward" in tilings) != ("grad_hidden" in tilings and "grad_weight" in tilings))
    assert "backward" in triton_ce.launch_config(64) and "backward" not in triton_ce.launch_config(128)


@pytest.mark.parametrize("config", [(32, 32, 4), (64, 128, 4), (128, 64, 8)])
def test_other_tilings_match(config):
    # An explicit config runs the two-kernel backward (the default at d <= 64 is the one-kernel
    # one): row slices of the item gradient, and tiles larger than the problem.
    errors = against_float64(*problem(300 if ON_GPU else 70, 90, 32), config=config)
    assert max(errors) < 1e-5, errors


def test_negative_targets_are_left_out():
    hidden, weight, targets = problem(150, 77, 64)
    targets[::3] = -1
    errors = against_float64(hidden, weight, targets)
    assert max(errors) < 1e-5, errors
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = triton_ce.linear_cross_entropy(h, w, torch.full_like(targets, -1))
    loss.backward()  # nothing scored: a loss of 0, and no gradient
    assert float(loss) == 0 and not h.grad.any() and not w.grad.any()


def test_bad_arguments_are_refused():
    hidden, weight, targets = problem(4, 10, 16)
    with pytest.raises(ValueError, match="precision must be one of"):
        triton_ce.linear_cross_entropy(hidden, weight, targets, precision="bf16")
    with pytest.raises(ValueError, match="must share d"):
        triton_ce.linear_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="config must be"):
        triton_ce.linear_cross_entropy(hidden, weight, targets, config=(64, 64))


def test_ce_kernel_choice():
    assert losses.describe_ce_kernel("auto", "cpu").startswith("torch")
    hidden, weight, targets = problem(4, 10, 16)
    with pytest.raises(RuntimeError, match="kernel 'triton': the Triton cross entropy runs on CUDA GPUs only"):
        losses.chunked_cross_entropy(hidden.cpu(), weight.cpu(), targets.cpu(), 8, kernel="triton")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_through_the_losses_module_under_bf16_autocast():
    assert losses.describe_ce_kernel("auto", "cuda").startswith("triton")
    hidden, weight, targets = problem(300, 500, 64)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = losses.chunked_cross_entropy(h, w, targets, 64, kernel="auto")
    loss.backward()
    expected = F.cross_entropy(h.double() @ w.double().t(), targets)
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_all_position_loss_marks_instead_of_gathering():
    """RecMamba's all-position CE through the triton kernel (unscored positions marked) equals the
    torch kernel's (scored positions gathered), loss and gradients."""
    from tests.test_cuda_graph import batch, build, loss_and_grads

    results = {}
    for kernel in ("torch", "triton"):
        model = build(mamba_backend="cuda", scan_kernel="triton", dropout_prob=0.0, cuda_graph=False, ce_kernel=kernel)
        model.train()
        assert losses.skips_negative_targets(kernel, "cuda") == (kernel == "triton")
        results[kernel] = loss_and_grads(model, batch(model))
    (loss, grads), (expected_loss, expected) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
