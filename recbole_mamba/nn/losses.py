"""Next-item losses over a flat set of positions: ``hidden`` (N, d) scored against item embeddings.

A prefix-trained batch has one position per sequence (N = batch size); an all-position batch has
every non-padding position of every window (N = batch x length, less the padding). The functions
here do not know which: the model flattens its positions first.

- :func:`chunked_cross_entropy`: softmax over every item, computed ``chunk_size`` positions at a
  time, in forward and in backward, so no (N x n_items) logits tensor is ever held;
- :func:`bpr_loss` and :func:`bce_loss`: one score per sampled negative and position;
- :func:`sampled_softmax_loss`: softmax over the target and negatives shared by all positions,
  with the logQ correction for the probability with which each item was sampled;
- :func:`sample_negatives`: uniform or in-batch negatives, drawn on the positions' device.

Sampled negatives that equal a position's own target ("accidental hits") are left out of that
position's loss: they would push the target's score down.
"""

import torch
import torch.nn.functional as F

NEGATIVE_SAMPLING = ("uniform", "in_batch")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean over positions of ``cross_entropy(hidden @ weight.T, targets)``, ``chunk_size`` rows at a time.

    Forward keeps only each position's log-sum-exp; backward recomputes each chunk's logits and
    turns them into the chunk's gradient at once (softmax minus one-hot). Peak extra memory is one
    chunk's logits (``chunk_size x n_items``) instead of all of them. Computed in at least float32
    (a softmax over thousands of items needs it; autocast is off inside); gradients come back in
    the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h32, w32 = _at_least_float32(hidden), _at_least_float32(weight)
            lse = torch.empty(hidden.size(0), dtype=h32.dtype, device=hidden.device)
            target_logit = (h32 * w32[targets]).sum(dim=-1)
            for start in range(0, hidden.size(0), chunk_size):
                stop = start + chunk_size
                lse[start:stop] = torch.logsumexp(h32[start:stop] @ w32.t(), dim=-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        n_positions = hidden.size(0)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h32, w32 = _at_least_float32(hidden), _at_least_float32(weight)
            grad_hidden = torch.empty_like(h32)
            grad_weight = torch.zeros_like(w32)
            scale = grad_loss.to(h32.dtype) / n_positions
            for start in range(0, n_positions, ctx.chunk_size):
                stop = start + ctx.chunk_size
                h_chunk = h32[start:stop]
                # d(mean CE)/d(logits) = (softmax - one_hot(target)) / N, built in place.
                grad_logits = torch.exp(h_chunk @ w32.t() - lse[start:stop, None])
                rows = torch.arange(h_chunk.size(0), device=hidden.device)
                grad_logits[rows, targets[start:stop]] -= 1
                grad_logits *= scale
                grad_hidden[start:stop] = grad_logits @ w32
                grad_weight.addmm_(grad_logits.t(), h_chunk)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


def _at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    """Full-softmax cross entropy of (N, d) ``hidden`` over all rows of ``weight``, averaged over N.

    Equals ``F.cross_entropy(hidden @ weight.t(), targets)`` (values and gradients) without
    materialising the (N, n_items) logits; see :class:`ChunkedCrossEntropy`.
    """
    return ChunkedCrossEntropy.apply(hidden, weight, targets, int(chunk_size))


def sample_negatives(targets, shape, n_items, how, generator=None):
    """Draw negative item ids of ``shape`` on ``targets``' device.

    ``uniform``: every real item (ids 1 .. n_items - 1, 0 being padding) equally likely.
    ``in_batch``: the targets of randomly chosen positions of this batch, so items come with the
    frequency they have as targets (popular items more often).
    """
    device = targets.device
    if how == "uniform":
        return torch.randint(1, n_items, shape, device=device, generator=generator)
    if how == "in_batch":
        picks = torch.randint(0, targets.numel(), shape, device=device, generator=generator)
        return targets.reshape(-1)[picks]
    raise ValueError(f"negative sampling must be one of {NEGATIVE_SAMPLING}, got {how!r}")


def bpr_loss(pos_scores, neg_scores, valid):
    """RecBole's BPR, ``-log(1e-10 + sigmoid(pos - neg))``, averaged over the valid (position, negative) pairs.

    ``pos_scores`` (N,), ``neg_scores`` and ``valid`` (N, k).
    """
    pair_loss = -torch.log(1e-10 + torch.sigmoid(pos_scores[:, None] - neg_scores))
    return (pair_loss * valid).sum() / valid.sum().clamp_min(1)


def bce_loss(pos_scores, neg_scores, valid):
    """Binary cross entropy, target vs. each valid negative: per position
    ``-log sigmoid(pos) - sum_k log sigmoid(-neg_k)``, averaged over positions (SASRec's loss for k = 1).
    """
    neg_term = (F.logsigmoid(-neg_scores) * valid).sum(dim=-1)
    return -(F.logsigmoid(pos_scores) + neg_term).mean()


def sampled_softmax_loss(pos_scores, neg_scores, targets, negatives, log_q_pos=None, log_q_neg=None):
    """Softmax cross entropy over [target, k negatives shared by every position], averaged over positions.

    ``pos_scores`` (N,), ``neg_scores`` (N, k), ``targets`` (N,), ``negatives`` (k,). With
    ``log_q_pos`` (N,) and ``log_q_neg`` (k,), the log-probability with which each item is sampled
    is subtracted from its score (logQ correction), so that the sampled softmax estimates the full
    one instead of over-penalising popular items. A negative equal to a position's target is masked.
    """
    if log_q_pos is not None:
        pos_scores = pos_scores - log_q_pos
        neg_scores = neg_scores - log_q_neg[None, :]
    neg_scores = neg_scores.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos_scores[:, None], neg_scores], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_scores).mean()


def in_batch_log_q(targets, items, n_items):
    """log of each of ``items``' share among ``targets``: the probability that in-batch sampling draws it."""
    counts = torch.bincount(targets, minlength=n_items).float()
    return torch.log(counts[items] / targets.numel())
