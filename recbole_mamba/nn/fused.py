"""The element-wise parts of a Mamba4Rec layer, fused into single GPU kernels while training.

At hidden size 64 these steps are memory-bound and PyTorch runs each as its own kernel: a LayerNorm
with dropout and a residual add reads and writes the activations three times forwards and again
backwards, and its kernels are tuned for wide rows, not rows of 64. On ml-1m (batch 2048, length
200) a Mamba4Rec step spends about 5 ms of 25 in them. ``torch.compile`` generates one kernel for
each group (and one for its backward); see ``benchmarks/results/fused_ops.md``.

Each function is its plain PyTorch twin when not training on a CUDA device (evaluation, the CPU)
or for small batches (``MIN_FUSED_ROWS``, except while a CUDA graph is built), and falls
back to it, with one warning, where compilation fails. ``TORCH_COMPILE_DISABLE=1`` turns
compilation off.
"""

import logging

import torch
import torch.nn.functional as F

from recbole_mamba.nn import cuda_graph


def _dropout_add_layer_norm(x, residual, weight, bias, eps, p):
    hidden = F.dropout(x, p, training=True)
    if residual is not None:
        hidden = hidden + residual
    return F.layer_norm(hidden, (hidden.shape[-1],), weight, bias, eps)


def _gelu_dropout(x, p):
    return F.dropout(F.gelu(x), p, training=True)


class _CompiledOnCuda:
    """``function`` compiled by ``torch.compile`` on first use; the function itself if that fails."""

    def __init__(self, function):
        self.function = function
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            # The first call compiles (seconds, once per process and batch layout): say so, as
            # the first training batch would otherwise seem to hang.
            logging.getLogger().info(f"Compiling {self.function.__name__} with torch.compile (first use)")
            self.compiled = torch.compile(self.function)
        if self.compiled is self.function:
            return self.function(*args)
        try:
            return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - a compiler failure must not stop training
            logging.getLogger().warning(
                f"torch.compile failed for {self.function.__name__} ({type(error).__name__}: {error}); "
                "using the unfused PyTorch operations instead."
            )
            self.compiled = self.function
            return self.function(*args)


_fused_dropout_add_layer_norm = _CompiledOnCuda(_dropout_add_layer_norm)
_fused_gelu_dropout = _CompiledOnCuda(_gelu_dropout)


# A compiled call costs the host more than the few kernels it replaces (guards, autograd wrappers):
# it pays only where the GPU work is large. On an H100, fused is faster at 409,600 rows of 64 (an
# ml-1m prefix batch) and slower at 65,536 (a lifelong batch of 32 x 2048): benchmarks/results/fused_ops.md.
MIN_FUSED_ROWS = 200_000


def _fuse(x, dropout):
    # Work captured in a CUDA graph costs the host nothing per kernel at replay: fuse at every size.
    return (x.is_cuda and dropout.training and torch.is_grad_enabled()
            and (cuda_graph.building() or x.numel() // x.shape[-1] >= MIN_FUSED_ROWS))


def _rows(t):
    """``t`` as (rows, features) with the row count symbolic, so a new batch size (the last batch
    of an epoch) does not compile the function again."""
    if t is None:
        return None
    rows = t.reshape(-1, t.shape[-1])
    torch._dynamo.mark_dynamic(rows, 0)
    return rows


def dropout_add_layer_norm(x, residual, dropout, norm):
    """``norm(dropout(x) + residual)`` (``residual`` may be None): nn.Dropout and nn.LayerNorm modules."""
    if _fuse(x, dropout):
        out = _fused_dropout_add_layer_norm(_rows(x), _rows(residual), norm.weight, norm.bias, norm.eps, dropout.p)
        return out.view(*x.shape[:-1], out.shape[-1])
    hidden = dropout(x)
    return norm(hidden + residual if residual is not None else hidden)


def gelu_dropout(x, dropout):
    """``dropout(gelu(x))`` (exact GELU) with an nn.Dropout module."""
    if _fuse(x, dropout):
        return _fused_gelu_dropout(_rows(x), dropout.p).view(x.shape)
    return dropout(F.gelu(x))
