"""GPU: mamba-ssm's fused kernels (the ``cuda`` backend) against the pure-PyTorch twin.

Skipped on machines without CUDA or without mamba-ssm; run on the GPU machine.
"""

import contextlib
import copy

import pytest
import torch
from recbole.utils.case_study import full_sort_topk

from recbole_mamba.nn.mamba_mixer import MambaMixer, resolve_backend
from recbole_mamba.quick_start import load_data_and_model, run
from tests.conftest import FAST_SETTINGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_backend():
    backend, description = resolve_backend("auto", "cuda")
    if backend != "cuda":
        pytest.skip(f"mamba-ssm kernels unavailable: {description}")
    return description


def relative_error(actual, expected, floor=1e-8):
    """max|actual - expected| / max|expected|, the denominator at least ``floor``.

    The floor makes a gradient that is zero in exact arithmetic (dA at length 1: the state before
    the first step is 0) compare as equal to the ~1e-15 rounding noise one kernel leaves there.
    """
    difference = (actual.double() - expected.double()).abs().max()
    return (difference / expected.double().abs().max().clamp(min=floor)).item()


def twin_mixers(seed=0, d_model=64, d_state=32, scan_kernel="mamba_ssm", recompute_scan_inputs=False):
    torch.manual_seed(seed)
    fast = MambaMixer(d_model, d_state=d_state, d_conv=4, expand=2, backend="cuda", scan_kernel=scan_kernel,
                      recompute_scan_inputs=recompute_scan_inputs).cuda()
    slow = MambaMixer(d_model, d_state=d_state, d_conv=4, expand=2, backend="torch").cuda()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize(
    "length, fused",
    # fused: mamba_inner_fn with causal-conv1d; not fused: what runs without causal-conv1d
    [(1, True), (7, True), (200, True), (2048, True), (8192, True), (7, False), (200, False)],
)
def test_cuda_and_torch_backends_agree_fp32(cuda_backend, length, fused):
    fast, slow = twin_mixers()
    fast._kernels = {**fast._kernels, "fused": fused}
    assert_backends_agree(fast, slow, length, tolerance=1e-4)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("length", [1, 7, 200, 2048, 8192])
def test_triton_scan_kernel_and_torch_backend_agree_fp32(cuda_backend, length, recompute):
    fast, slow = twin_mixers(scan_kernel="triton", recompute_scan_inputs=recompute)
    assert_backends_agree(fast, slow, length, tolerance=1e-4)


@pytest.mark.parametrize("length", [1, 200])
def test_triton_scan_at_an_inner_width_not_a_multiple_of_8(cuda_backend, length):
    """causal-conv1d's channel-last kernels need widths that are multiples of 8: d_inner 20 goes in channel-first."""
    fast, slow = twin_mixers(d_model=10, d_state=8, scan_kernel="triton")
    assert_backends_agree(fast, slow, length, tolerance=1e-4)


@pytest.mark.parametrize("scan_kernel, recompute", [("mamba_ssm", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("length", [1, 7, 200, 2048, 8192])
def test_cuda_and_torch_backends_agree_bf16_autocast(cuda_backend, length, scan_kernel, recompute):
    fast, slow = twin_mixers(scan_kernel=scan_kernel, recompute_scan_inputs=recompute)
    assert_backends_agree(fast, slow, length, tolerance=1e-2, autocast_dtype=torch.bfloat16)


def test_auto_scan_kernel_is_timed_once_per_shape_and_leaves_no_trace(cuda_backend, caplog):
    """``auto`` times both kernels on a probe input: the parameters' gradients and the RNG stay as they were."""
    from recbole_mamba.nn import mamba_mixer

    fast, slow = twin_mixers(scan_kernel="auto")
    for p in fast.parameters():
        p.grad = torch.full_like(p, 3.0)
    x = torch.randn(3, 37, 64, device="cuda")
    rng = torch.cuda.get_rng_state()
    with caplog.at_level("INFO"):
        y = fast(x)
        fast(x)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in fast.parameters())
    timed = [r.message for r in caplog.records if "Mamba scan kernel" in r.message]
    assert len(timed) == 1 and "batch 3 x length 37 (training; kept for batches up to 4 x lengths up to 64)" \
        in timed[0], timed
    with caplog.at_level("INFO"):
        fast(x[:, :40 - 7])  # another length in the same bucket: no new measurement
    assert len([r for r in caplog.records if "Mamba scan kernel" in r.message]) == 1
    choice = [v for k, v in mamba_mixer._FASTER_SCAN_KERNEL.items() if k[:3] == (4, 64, 64)]
    assert choice and choice[0] in ("mamba_ssm", "triton")
    assert relative_error(y.detach(), slow(x).detach()) < 1e-4


@pytest.mark.parametrize("as_graph", [False, True])
def test_auto_scan_kernel_timing_hands_its_memory_back(cuda_backend, as_graph):
    """The probe's activations (and, timed as graphs, their pool) are not left cached by the allocator,
    where the model could not reuse them and they would add to the run's peak memory."""
    from recbole_mamba.nn import cuda_graph

    fast, _ = twin_mixers(scan_kernel="auto")
    x = torch.randn(16, 4096, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with cuda_graph._while_building() if as_graph else contextlib.nullcontext():
        fast._time_scan_kernels(x, training=True, key=(16, 4096))
    used = torch.cuda.max_memory_allocated() - before
    left_cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert used > 64 * 2**20, f"the probe used only {used / 2**20:.0f} MiB: too small a shape to tell"
    assert left_cached < used / 8, f"{left_cached / 2**20:.0f} MiB left cached after a timing that used {used / 2**20:.0f} MiB"


def assert_backends_agree(fast, slow, length, tolerance, autocast_dtype=None):
    """Same input and output gradient through both mixers: output, input grad, every parameter grad."""
    batch = 4 if length <= 200 else 2
    width = fast.in_proj.in_features
    x = torch.randn(batch, length, width, device="cuda")
    grad_out = torch.randn(batch, length, width, device="cuda")
    outputs = {}
    for name, mixer in (("cuda", fast), ("torch", slow)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            y = mixer(xi)
        if autocast_dtype is not None:
            assert y.dtype == autocast_dtype, name  # autocast really was in effect
        y.backward(grad_out.to(y.dtype))
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads.values()), name  # fp32 master parameters
        outputs[name] = (y.detach(), xi.grad, grads)
    errors = {"output": relative_error(outputs["cuda"][0], outputs["torch"][0]),
              "input grad": relative_error(outputs["cuda"][1], outputs["torch"][1])}
    for name in outputs["torch"][2]:
        errors[f"{name} grad"] = relative_error(outputs["cuda"][2][name], outputs["torch"][2][name])
    too_large = {name: f"{error:.2e}" for name, error in errors.items() if not error < tolerance}
    assert not too_large, f"relative errors above {tolerance}: {too_large}"


def test_state_dict_moves_to_cpu_torch_backend(cuda_backend):
    fast, _ = twin_mixers(seed=1)
    cpu = MambaMixer(64, d_state=32, d_conv=4, expand=2, backend="torch")
    cpu.load_state_dict(copy.deepcopy(fast.state_dict()))
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        assert relative_error(cpu(x), fast(x.cuda()).cpu()) < 1e-4


def test_cuda_backend_refuses_cpu_tensors(cuda_backend):
    fast, _ = twin_mixers()
    with pytest.raises(RuntimeError, match="mamba_backend=torch"):
        fast.cpu()(torch.randn(1, 3, 64))


def test_gpu_trained_checkpoint_ranks_the_same_on_the_cpu(cuda_backend, tiny_ml100k):
    """Train with the cuda backend, reload the checkpoint on the CPU (torch backend): same top-10 per test user."""
    data_path, name = tiny_ml100k
    settings = {**FAST_SETTINGS, "data_path": data_path, "epochs": 5, "mamba_backend": "auto"}
    model_file = run("Mamba4Rec", name, config_dict=settings)["model_file"]

    rankings = {}
    for device in ("cuda", "cpu"):
        _, model, _, _, _, test_data = load_data_and_model(model_file, map_location=device)
        assert model.backend == ("cuda" if device == "cuda" else "torch")
        users = test_data.dataset.inter_feat[test_data.dataset.uid_field].numpy()
        scores, items = full_sort_topk(users, model, test_data, k=10, device=torch.device(device))
        rankings[device] = (scores.cpu(), items.cpu())
    assert len(users) == 100
    assert torch.equal(rankings["cuda"][1], rankings["cpu"][1])
    assert relative_error(rankings["cuda"][0], rankings["cpu"][0]) < 1e-4
