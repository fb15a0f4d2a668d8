"""The Mamba block that recomputes its scan inputs in the backward against the same block run step by
step under autograd (its twin): output, input gradient and every parameter's gradient.

Without a GPU the Triton scan runs through Triton's interpreter (``TRITON_INTERPRET=1``): small shapes.
"""

import os

import pytest
import torch

from recbole_mamba.model import RecMamba
from recbole_mamba.nn.mamba_mixer import MambaMixer

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
triton_scan = pytest.importorskip("recbole_mamba.nn.triton_scan", reason="needs triton")
from recbole_mamba.nn.triton_mixer import mixer_with_recomputation  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def run(forward, mixer, hidden, dout, input_grad=True):
    mixer.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(input_grad)
    out = forward(mixer, x)
    out.backward(dout)
    grads = {name: p.grad for name, p in mixer.named_parameters()}
    return out.detach(), x.grad, grads


def step_by_step(mixer, x):
    return mixer._forward_unfused(x, triton_scan.selective_scan_triton)


def assert_twins_agree(mixer, batch, length, input_grad=True):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, length, mixer.in_proj.in_features, generator=generator).to(DEVICE)
    dout = torch.randn(hidden.shape, generator=generator).to(DEVICE)
    out, d_hidden, grads = run(mixer_with_recomputation, mixer, hidden, dout, input_grad)
    twin_out, twin_d_hidden, twin_grads = run(step_by_step, mixer, hidden, dout, input_grad)
    torch.testing.assert_close(out, twin_out, rtol=1e-5, atol=1e-6)
    if input_grad:
        torch.testing.assert_close(d_hidden, twin_d_hidden, rtol=1e-5, atol=1e-6)
    else:
        assert d_hidden is None
    assert grads.keys() == twin_grads.keys()
    for name, grad in grads.items():
        if twin_grads[name] is None:
            assert grad is None, name
            continue
        assert grad is not None, name
        if length > 1:  # at length 1, A's gradient is zero (the state before the first step is 0)
            assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, twin_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def small_mixer(d_model=8, d_state=4):
    torch.manual_seed(0)
    return MambaMixer(d_model, d_state=d_state, d_conv=4, expand=2, backend="torch").to(DEVICE)


@pytest.mark.parametrize("batch, length", [(2, 1), (3, 13)])
def test_output_and_every_gradient_match_the_step_by_step_block(batch, length):
    assert_twins_agree(small_mixer(), batch, length)


def test_time_segments(monkeypatch):
    # Short sequences cut into time segments (their summaries are kept for the backward): the
    # segments the scan picks for long sequences in small batches, at a length the interpreter runs fast.
    monkeypatch.setattr(triton_scan, "launch_config", lambda d, n, L, batch=None: (8, 4, 1, 3))
    mixer = small_mixer()
    held = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t, lambda t: t):
        mixer_with_recomputation(mixer, torch.randn(2, 29, 8, device=DEVICE, requires_grad=True))
    assert len(held) == 5  # input, scan output, out_proj's weight and the two segment summaries
    assert_twins_agree(mixer, 2, 29)


def test_frozen_parameters_and_an_input_without_gradient():
    mixer = small_mixer()
    mixer.A_log.requires_grad_(False)
    mixer.in_proj.weight.requires_grad_(False)
    assert_twins_agree(mixer, 2, 9, input_grad=False)


def test_holds_only_the_input_and_the_scan_output():
    mixer = small_mixer(d_model=8)
    hidden = torch.randn(2, 16, 8, device=DEVICE, requires_grad=True)
    held = []

    def pack(tensor):
        held.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer_with_recomputation(mixer, hidden)
    shapes = sorted(tuple(t.shape) for t in held)
    # the input, the scan output (2, d_inner, 16) and out_proj's weight: nothing else
    assert shapes == sorted([(2, 16, 8), (2, mixer.d_inner, 16), (8, mixer.d_inner)])
    held.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_by_step(mixer, hidden)
    assert sum(t.numel() for t in held) > 2 * (2 * 16 * (8 + mixer.d_inner))  # the twin holds much more


def test_the_setting_reaches_every_block_and_is_checked():
    from recbole_mamba.errors import UserInputError
    from recbole_mamba.model import Mamba4Rec
    from tests.test_cuda_graph import build

    for model_class in (RecMamba, Mamba4Rec):
        settings = {"mamba_backend": "torch", "train_mode": "all_positions"}
        assert not any(layer.mamba.recompute_scan_inputs for layer in build(model_class, **settings).mamba_layers)
        on = build(model_class, recompute_scan_inputs=True, **settings)
        assert all(layer.mamba.recompute_scan_inputs for layer in on.mamba_layers)
    with pytest.raises(UserInputError, match="recompute_scan_inputs must be true or false, got 1"):
        build(RecMamba, mamba_backend="torch", recompute_scan_inputs=1)
