"""Next-item losses over a flat set of positions: ``hidden`` (N, d) scored against item embeddings.

A prefix-trained batch has one position per sequence (N = batch size); an all-position batch has
every non-padding position of every window (N = batch x length, less the padding). The functions
here do not know which: the model flattens its positions first.

- :func:`chunked_cross_entropy`: softmax over every item, computed ``chunk_size`` positions at a
  time, so no (N x n_items) logits tensor is ever held (in PyTorch, or in Liger-Kernel's fused
  Triton kernel), or on a GPU by default without any logits in memory (:mod:`recbole_mamba.nn.triton_ce`);
- :func:`bpr_loss` and :func:`bce_loss`: one score per sampled negative and position;
- :func:`sampled_softmax_loss`: softmax over the target and negatives shared by all positions,
  with the logQ correction for the probability with which each item was sampled;
- :func:`sample_negatives`: uniform or in-batch negatives, drawn on the positions' device.

Sampled negatives that equal a position's own target ("accidental hits") are left out of that
position's loss: they would push the target's score down.
"""

import functools
import math

import torch
import torch.nn.functional as F

NEGATIVE_SAMPLING = ("uniform", "in_batch")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean over positions of ``cross_entropy(hidden @ weight.T, targets)``, ``chunk_size`` rows at a time.

    Peak extra memory is one chunk's logits (``chunk_size x n_items``) instead of all of them.
    With ``with_grad`` (training), each chunk's logits become the chunk's gradient (softmax minus
    one-hot) while they are in memory, so backward only scales the stored gradients: three GEMMs
    and one pass over the logits per chunk, instead of recomputing them in backward. Computed in
    at least float32 (a softmax over thousands of items needs it; autocast is off inside);
    gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, with_grad):
        n_positions = hidden.size(0)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h32, w32 = _at_least_float32(hidden), _at_least_float32(weight)
            position_losses = torch.empty(n_positions, dtype=h32.dtype, device=hidden.device)
            grad_hidden = torch.empty_like(h32) if with_grad else None
            grad_weight = torch.zeros_like(w32) if with_grad else None
            for start in range(0, n_positions, chunk_size):
                stop = start + chunk_size
                h_chunk, t_chunk = h32[start:stop], targets[start:stop]
                logits = h_chunk @ w32.t()
                lse = torch.logsumexp(logits, dim=-1)
                rows = torch.arange(h_chunk.size(0), device=hidden.device)
                position_losses[start:stop] = lse - logits[rows, t_chunk]
                if with_grad:  # d(sum of CE)/d(logits) = softmax - one_hot(target), in the logits' memory
                    grad_logits = logits.sub_(lse[:, None]).exp_()
                    grad_logits[rows, t_chunk] -= 1
                    grad_hidden[start:stop] = grad_logits @ w32
                    grad_weight.addmm_(grad_logits.t(), h_chunk)
        if with_grad:
            ctx.save_for_backward(grad_hidden / n_positions, grad_weight / n_positions)
        ctx.dtypes = hidden.dtype, weight.dtype
        return position_losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.saved_tensors:
            raise RuntimeError("ChunkedCrossEntropy was called with with_grad=False: it has no gradient to give.")
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype), None, None, None


def _at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@functools.cache  # called at every training step: look for the package once
def _liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross entropy (Triton), or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def chunked_cross_entropy(hidden, weight, targets, chunk_size, kernel="auto"):
    """Full-softmax cross entropy of (N, d) ``hidden`` over all rows of ``weight``, averaged over N.

    Equals ``F.cross_entropy(hidden @ weight.t(), targets)`` (values and gradients) without
    materialising the (N, n_items) logits. ``kernel``:

    - ``torch`` (:class:`ChunkedCrossEntropy`): ``chunk_size`` positions' logits at a time, anywhere;
    - ``liger``: Liger-Kernel's fused Triton kernel over the same chunks (one pass over each chunk's
      logits instead of several; CUDA tensors, needs ``liger-kernel``, installed by the ``gpu`` extra);
    - ``triton`` (:mod:`recbole_mamba.nn.triton_ce`): no logits in memory at all, float32-accurate
      tensor-core products (CUDA tensors; ``chunk_size`` does not apply; a negative target leaves
      its position out, see :func:`skips_negative_targets`);
    - ``auto``: ``triton`` for CUDA tensors where Triton imports, else ``torch``.
    """
    if kernel not in CE_KERNELS:
        raise ValueError(f"kernel must be one of {CE_KERNELS}, got {kernel!r}")
    chosen = _resolve_kernel(kernel, hidden.device)
    if chosen == "triton":
        from recbole_mamba.nn.triton_ce import linear_cross_entropy

        with torch.autocast(device_type="cuda", enabled=False):
            return linear_cross_entropy(hidden, weight, targets)
    if chosen == "liger":
        n_positions, dim = hidden.shape
        # Liger sizes its chunks as about chunk_mem_const x N x d logits: ask for chunk_size rows.
        chunk_mem_const = max(1, math.ceil(chunk_size * weight.size(0) / (max(n_positions, 1) * dim)))
        with torch.autocast(device_type="cuda", enabled=False):
            return _liger_fused_linear_cross_entropy()(
                _at_least_float32(hidden), _at_least_float32(weight), targets, chunk_mem_const=chunk_mem_const)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(hidden, weight, targets, int(chunk_size), with_grad)


CE_KERNELS = ("auto", "torch", "liger", "triton")


def liger_cross_entropy_missing(device):
    """Why the liger CE kernel cannot run on ``device``, or None when it can."""
    if torch.device(device).type != "cuda":
        return f"Liger-Kernel's cross entropy runs on CUDA GPUs only, and the device is {device}."
    if _liger_fused_linear_cross_entropy() is None:
        return "liger-kernel is not installed: pip install -e '.[gpu]' (or pip install liger-kernel)."
    return None


def triton_cross_entropy_missing(device):
    """Why the triton CE kernel cannot run on ``device``, or None when it can."""
    if torch.device(device).type != "cuda":
        return f"the Triton cross entropy runs on CUDA GPUs only, and the device is {device}."
    if not _triton_importable():
        return "triton is not importable (it ships with torch's CUDA builds): use ce_kernel torch or liger."
    return None


@functools.cache
def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ce_kernel_missing(kernel, device):
    """Why ``chunked_cross_entropy(kernel=kernel)`` cannot run on ``device``, or None when it can
    (``auto`` and ``torch`` always can)."""
    missing = {"liger": liger_cross_entropy_missing, "triton": triton_cross_entropy_missing}.get(kernel)
    return missing(device) if missing else None


def _resolve_kernel(kernel, device):
    """The CE implementation ``chunked_cross_entropy(kernel=kernel)`` runs on ``device``: an error
    where ``liger`` or ``triton`` is asked for and cannot run there."""
    if kernel == "auto":
        return "triton" if triton_cross_entropy_missing(device) is None else "torch"
    if missing := ce_kernel_missing(kernel, device):
        raise RuntimeError(f"kernel '{kernel}': {missing}")
    return kernel


def skips_negative_targets(kernel, device):
    """Whether ``chunked_cross_entropy(kernel=kernel)`` on ``device`` leaves out the positions whose
    target is negative (the triton kernel), so that a caller may mark its unscored positions
    instead of gathering the scored ones: a gather needs their count on the host, a wait for the GPU."""
    return _resolve_kernel(kernel, device) == "triton"


def describe_ce_kernel(kernel, device):
    """The implementation ``chunked_cross_entropy(kernel=kernel)`` uses on ``device``, in words."""
    chosen = _resolve_kernel(kernel, device)
    if chosen == "torch":
        return "torch (recbole_mamba.nn.losses.ChunkedCrossEntropy)"
    if chosen == "triton":
        return "triton (recbole_mamba.nn.triton_ce, 3xTF32 products)"
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = f" {version('liger-kernel')}"
    except PackageNotFoundError:  # importable without its metadata (e.g. from a plain folder)
        release = ""
    return f"liger (Liger-Kernel{release} fused linear cross entropy)"


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
