"""The fused element-wise ops and the index_add embedding backward against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recbole_mamba.nn import fused
from recbole_mamba.nn.embedding import IndexAddEmbedding, embedding_lookup
from recbole_mamba.nn.fused import dropout_add_layer_norm, gelu_dropout

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lookups(device, rows=50, shape=(6, 30)):
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, rows, shape, generator=generator)  # repeats, and padding (0)
    indices[:, -5:] = 0
    return indices.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_idx", [0, None])
def test_index_add_embedding_matches_nn_embedding(device, padding_idx):
    torch.manual_seed(0)
    reference = nn.Embedding(50, 8, padding_idx=padding_idx).to(device)
    ours = nn.Embedding(50, 8, padding_idx=padding_idx).to(device)
    ours.load_state_dict(reference.state_dict())
    indices = lookups(device)
    upstream = torch.randn(*indices.shape, 8, device=device)
    (reference(indices) * upstream).sum().backward()
    out = IndexAddEmbedding.apply(indices, ours.weight, padding_idx)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, reference(indices), rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-6)
    if padding_idx is not None:
        assert not ours.weight.grad[padding_idx].any()


def test_index_add_embedding_gradient_has_the_weights_dtype():
    weight = torch.randn(10, 4, requires_grad=True)
    out = IndexAddEmbedding.apply(lookups("cpu", rows=10), weight, 0)
    out.backward(torch.ones_like(out, dtype=torch.bfloat16).float())
    assert weight.grad.dtype == torch.float32 and weight.grad.shape == weight.shape


def test_embedding_lookup_is_the_module_where_it_does_not_apply():
    embedding = nn.Embedding(10, 4, padding_idx=0)
    indices = lookups("cpu", rows=10)
    assert torch.equal(embedding_lookup(indices, embedding), embedding(indices))
    with torch.no_grad():
        assert torch.equal(embedding_lookup(indices, embedding), embedding(indices))


def layer_modules(device, p):
    torch.manual_seed(0)
    norm = nn.LayerNorm(16, eps=1e-12).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return nn.Dropout(p), norm


@pytest.mark.parametrize("with_residual", [True, False])
def test_on_the_cpu_the_fused_ops_are_the_modules(with_residual):
    dropout, norm = layer_modules("cpu", 0.3)
    x, residual = torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    residual = residual if with_residual else None
    torch.manual_seed(1)
    ours = dropout_add_layer_norm(x, residual, dropout, norm)
    torch.manual_seed(1)
    theirs = norm(dropout(x) + residual) if with_residual else norm(dropout(x))
    assert torch.equal(ours, theirs)
    torch.manual_seed(1)
    ours = gelu_dropout(x, dropout)
    torch.manual_seed(1)
    assert torch.equal(ours, dropout(F.gelu(x)))


def twin_inputs(device, with_residual):
    torch.manual_seed(2)
    x = torch.randn(32, 50, 16, device=device, requires_grad=True)
    residual = torch.randn(32, 50, 16, device=device, requires_grad=True) if with_residual else None
    return x, residual


@pytest.fixture
def always_fused(monkeypatch):
    """The compiled path at the tests' small sizes too."""
    monkeypatch.setattr(fused, "MIN_FUSED_ROWS", 0)


def grads(output, tensors, upstream):
    return torch.autograd.grad(output, [t for t in tensors if t is not None], upstream)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_residual", [True, False])
def test_compiled_ops_match_pytorch_without_dropout(always_fused, with_residual):
    dropout, norm = layer_modules("cuda", 0.0)
    x, residual = twin_inputs("cuda", with_residual)
    upstream = torch.randn_like(x)
    ours = dropout_add_layer_norm(x, residual, dropout, norm)
    theirs = norm(x + residual) if with_residual else norm(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(ours, [x, residual, norm.weight, norm.bias], upstream),
                    grads(theirs, [x, residual, norm.weight, norm.bias], upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ours, theirs = gelu_dropout(x, dropout), F.gelu(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(ours, [x], upstream)[0], grads(theirs, [x], upstream)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_residual", [True, False])
def test_compiled_dropout_drops_a_fraction_p_and_scales_the_rest(always_fused, with_residual):
    p = 0.25
    dropout, norm = layer_modules("cuda", p)
    x, residual = twin_inputs("cuda", with_residual)
    ours = dropout_add_layer_norm(x, residual, dropout, norm)
    # Where the dropout kept an element, the output depends on it: its gradient is not zero.
    grad_x = torch.autograd.grad(ours.sum() + (ours ** 2).sum(), x)[0]
    kept = grad_x != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.02
    hidden = torch.where(kept, x / (1 - p), torch.zeros_like(x))
    expected = norm(hidden + residual) if with_residual else norm(hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    out = gelu_dropout(x, dropout)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.02
    torch.testing.assert_close(out[kept], (F.gelu(x) / (1 - p))[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_new_batch_size_does_not_compile_again(always_fused):
    from torch._dynamo.utils import counters

    dropout, norm = layer_modules("cuda", 0.1)
    dropout_add_layer_norm(torch.randn(8, 5, 16, device="cuda", requires_grad=True), None, dropout, norm)
    compiled = counters["stats"]["unique_graphs"]
    for batch in (3, 8, 11):
        out = dropout_add_layer_norm(torch.randn(batch, 5, 16, device="cuda", requires_grad=True), None, dropout, norm)
        assert out.shape == (batch, 5, 16)
    assert counters["stats"]["unique_graphs"] == compiled
