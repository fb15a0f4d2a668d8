"""An embedding lookup whose backward adds the gradients with ``index_add_``.

PyTorch's CUDA embedding backward sorts all looked-up indices to sum each row's gradients without
atomics. For a recommendation batch (2048 x 200 lookups into a table of a few thousand items) the
sort dominates: about 2 ms a step on an H100, against about 1 ms for adding the rows in place with
``index_add_`` (``benchmarks/results/fused_ops.md``). The sum's order then varies between runs, as it
does in the selective scans' backward.
"""

import torch
import torch.nn.functional as F


class IndexAddEmbedding(torch.autograd.Function):
    """``F.embedding(indices, weight, padding_idx)``, with the weight's gradient summed by index_add_."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx=None):
        ctx.save_for_backward(indices)
        ctx.rows, ctx.dtype, ctx.padding_idx = weight.shape[0], weight.dtype, padding_idx
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_weight = grad.new_zeros((ctx.rows, grad.shape[-1]))
        grad_weight.index_add_(0, indices.reshape(-1), grad)
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            grad_weight[ctx.padding_idx] = 0
        return None, grad_weight, None


def embedding_lookup(indices, embedding):
    """``embedding(indices)`` for an nn.Embedding; on a CUDA device with IndexAddEmbedding's backward."""
    plain = embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse
    if indices.is_cuda and not plain and torch.is_grad_enabled() and embedding.weight.requires_grad:
        return IndexAddEmbedding.apply(indices, embedding.weight, embedding.padding_idx)
    return embedding(indices)
