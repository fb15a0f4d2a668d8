"""Full-softmax cross entropy of ``hidden @ weight.T`` in Triton, without the logits in memory.

:func:`linear_cross_entropy` equals ``F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1)``
(values and gradients, float32) for N positions, V items and hidden size d, except that a negative
target leaves its position out (all of them: a loss of 0) and that no step waits for the GPU: the
count of positions scored stays on the device, so a caller can mark unscored positions instead of
gathering the scored ones (which needs their count on the host). The chunked losses of
:mod:`recbole_mamba.nn.losses` write each chunk's (rows x V) logits to memory and read them back
several times, with float32 GEMMs that cannot use the tensor cores; at d = 64 that traffic and
those GEMMs are most of an all-position training step. Here no logits tensor exists:

- forward: one program per block of rows computes its logits tile by tile, keeping a running
  maximum and sum (the log-sum-exp) and the target's logit;
- backward: the logits are computed again, tile by tile, as softmax minus one-hot, and multiplied
  into the hidden states' gradient (one program per block of rows) and into the item embeddings'
  gradient: at d <= 64 in one kernel that adds each tile's item gradient with atomics (in no
  fixed order), else in a second kernel with one program per block of items and slice of rows
  (the slices' partial sums added afterwards, in a fixed order).

The products use the tensor cores in "3xTF32": each float32 operand is split into a TF32 value and
a TF32 remainder and three TF32 products are summed, which keeps float32's accuracy (about 1e-6
relative here) at several times the speed of float32 arithmetic. ``precision="ieee"`` uses plain
float32 arithmetic instead.
"""

import torch
import triton
import triton.language as tl

PRECISIONS = ("tf32x3", "ieee")


@triton.jit
def _load_rows(ptr, rows, n_rows, d, offs_d):
    """A (rows, d) tile of a row-major (n_rows, d) matrix, zero outside it."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < d)
    return tl.load(ptr + rows[:, None].to(tl.int64) * d + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, loss_ptr, N, V, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    h = _load_rows(h_ptr, rows, N, D, offs_d)
    target = tl.load(t_ptr + rows, mask=rows < N, other=-1)  # < 0: not scored
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    start = 0
    while start < V:  # (while, not range: Triton's interpreter cannot range() over a runtime bound with numpy 2)
        cols = start + tl.arange(0, BLOCK_N)
        start += BLOCK_N
        w = _load_rows(w_ptr, cols, V, D, offs_d)
        logits = tl.dot(h, tl.trans(w), input_precision=PRECISION)
        logits = tl.where(cols[None, :] < V, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp2((running_max - new_max) * 1.4426950408889634) + tl.sum(
            tl.exp2((logits - new_max[:, None]) * 1.4426950408889634), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=rows < N)
    tl.store(loss_ptr + rows, tl.where(target >= 0, lse - target_logit, 0.0), mask=rows < N)


@triton.jit
def _softmax_minus_one_hot(h, w, cols, V, lse, target, row_ok, PRECISION: tl.constexpr):
    """d(CE)/d(logits) of a (rows, items) tile: softmax - one_hot(target), 0 outside the matrix
    and for rows not scored (target < 0)."""
    logits = tl.dot(h, tl.trans(w), input_precision=PRECISION)
    p = tl.exp2((logits - lse[:, None]) * 1.4426950408889634)
    p = tl.where((row_ok & (target >= 0))[:, None] & (cols[None, :] < V), p, 0.0)
    return p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)


@triton.jit
def _row_block(h_ptr, t_ptr, lse_ptr, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of rows for a backward kernel: their indices, which exist, the d
    offsets, and the rows' hidden states, targets and log-sum-exps."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    h = _load_rows(h_ptr, rows, N, D, offs_d)
    target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    return rows, row_ok, offs_d, h, target, lse


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, scale_ptr, gh_ptr, N, V, D,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    rows, row_ok, offs_d, h, target, lse = _row_block(h_ptr, t_ptr, lse_ptr, N, D, BLOCK_M, BLOCK_D)
    grad = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = 0
    while start < V:
        cols = start + tl.arange(0, BLOCK_N)
        start += BLOCK_N
        w = _load_rows(w_ptr, cols, V, D, offs_d)
        p = _softmax_minus_one_hot(h, w, cols, V, lse, target, row_ok, PRECISION)
        grad += tl.dot(p, w, input_precision=PRECISION)
    grad *= tl.load(scale_ptr)
    tl.store(gh_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], grad,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, scale_ptr, partial_ptr, N, V, D, ROWS_PER_SLICE,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_slice = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    w = _load_rows(w_ptr, cols, V, D, offs_d)
    grad = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = row_slice * ROWS_PER_SLICE
    last = tl.minimum(first + ROWS_PER_SLICE, N)
    start = first
    while start < last:
        rows = start + tl.arange(0, BLOCK_M)
        start += BLOCK_M
        row_ok = rows < last
        h = _load_rows(h_ptr, rows, last, D, offs_d)
        target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = _softmax_minus_one_hot(h, w, cols, V, lse, target, row_ok, PRECISION)
        grad += tl.dot(tl.trans(p), h, input_precision=PRECISION)
    grad *= tl.load(scale_ptr)
    out = partial_ptr + row_slice.to(tl.int64) * V * D
    tl.store(out + cols[:, None].to(tl.int64) * D + offs_d[None, :], grad,
             mask=(cols[:, None] < V) & (offs_d[None, :] < D))


@triton.jit
def _backward_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, scale_ptr, gh_ptr, gw_ptr, N, V, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Both gradients from one computation of each logits tile: the hidden states' in registers,
    the item embeddings' added into ``gw_ptr`` with atomics (in no fixed order)."""
    rows, row_ok, offs_d, h, target, lse = _row_block(h_ptr, t_ptr, lse_ptr, N, D, BLOCK_M, BLOCK_D)
    scale = tl.load(scale_ptr)
    grad = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = 0
    while start < V:
        cols = start + tl.arange(0, BLOCK_N)
        start += BLOCK_N
        w = _load_rows(w_ptr, cols, V, D, offs_d)
        p = _softmax_minus_one_hot(h, w, cols, V, lse, target, row_ok, PRECISION) * scale
        grad += tl.dot(p, w, input_precision=PRECISION)
        tl.atomic_add(gw_ptr + cols[:, None].to(tl.int64) * D + offs_d[None, :],
                      tl.dot(tl.trans(p), h, input_precision=PRECISION),
                      mask=(cols[:, None] < V) & (offs_d[None, :] < D), sem="relaxed")
    tl.store(gh_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], grad,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


def launch_config(d):
    """{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)} for hidden size ``d``.

    At d <= 64 the backward is one kernel (``backward``: both gradients from one computation of
    each logits tile, the items' added with atomics), and each kernel has the tiling that was
    fastest on an H100 at 65,536 positions x 5,000 items (``benchmarks/NOTES.md``). Wider rows
    take the two backward kernels (``grad_hidden``, ``grad_weight``: no atomics, a fixed order)
    on 64 x 64 tiles (up to 128) or 64 x 32 tiles, which keep a program's operands within the
    shared memory.
    """
    if d <= 64:
        return {"forward": (128, 128, 8, 2), "backward": (128, 64, 8, 2)}
    tiles = (64, 64, 4, 3) if d <= 128 else (64, 32, 4, 3)
    return {"forward": tiles, "grad_hidden": tiles, "grad_weight": tiles}


class LinearCrossEntropy(torch.autograd.Function):
    """Mean over positions of ``cross_entropy(hidden @ weight.T, targets)``; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, precision, config):
        h, w = hidden.float().contiguous(), weight.float().contiguous()
        targets = targets.contiguous()
        n, d = h.shape
        v = w.shape[0]
        # An explicit config tiles the forward and the two-kernel backward alike.
        tilings = {"forward": (*config, 3), "grad_hidden": (*config, 3), "grad_weight": (*config, 3)} if config \
            else launch_config(d)
        block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs at least 16 along d
        lse = torch.empty(n, device=h.device, dtype=torch.float32)
        position_losses = torch.empty_like(lse)
        if n:
            block_m, block_n, warps, stages = tilings["forward"]
            _forward_kernel[(triton.cdiv(n, block_m),)](
                h, w, targets, lse, position_losses, n, v, d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                PRECISION=precision, num_warps=warps, num_stages=stages)
        scored = (targets >= 0).sum().clamp_min(1).float()  # on the device: no wait for the GPU
        ctx.save_for_backward(h, w, targets, lse, scored)
        ctx.settings = tilings, block_d, precision
        ctx.dtypes = hidden.dtype, weight.dtype
        return position_losses.sum() / scored

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, targets, lse, scored = ctx.saved_tensors
        tilings, block_d, precision = ctx.settings
        n, d = h.shape
        v = w.shape[0]
        # d(mean)/d(each position's loss), as a device tensor: reading it would wait for the GPU.
        scale = (grad_loss.float() / scored).reshape(1)
        grad_hidden = torch.empty_like(h)
        if "backward" in tilings and n:
            block_m, block_n, warps, stages = tilings["backward"]
            grad_weight = torch.zeros_like(w)
            _backward_kernel[(triton.cdiv(n, block_m),)](
                h, w, targets, lse, scale, grad_hidden, grad_weight, n, v, d, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d, PRECISION=precision, num_warps=warps, num_stages=stages)
            hidden_dtype, weight_dtype = ctx.dtypes
            return grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype), None, None, None
        block_m, block_n, warps, stages = tilings["grad_hidden"]
        if n:
            _grad_hidden_kernel[(triton.cdiv(n, block_m),)](
                h, w, targets, lse, scale, grad_hidden, n, v, d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                PRECISION=precision, num_warps=warps, num_stages=stages)
        # About 4 (item tile, row slice) programs per SM; each slice's partial gradient is summed
        # below, in a fixed order (the result does not depend on scheduling).
        block_m, block_n, warps, stages = tilings["grad_weight"]
        item_tiles, row_blocks = triton.cdiv(v, block_n), max(1, triton.cdiv(n, block_m))
        slices = max(1, min(row_blocks, triton.cdiv(4 * _sm_count(h.device), item_tiles)))
        rows_per_slice = triton.cdiv(row_blocks, slices) * block_m
        slices = max(1, triton.cdiv(n, rows_per_slice))
        partial = torch.empty(slices, v, d, device=h.device, dtype=torch.float32)
        if n:
            _grad_weight_kernel[(item_tiles, slices)](
                h, w, targets, lse, scale, partial, n, v, d, rows_per_slice, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d, PRECISION=precision, num_warps=warps, num_stages=stages)
        else:
            partial.zero_()
        hidden_dtype, weight_dtype = ctx.dtypes
        return grad_hidden.to(hidden_dtype), partial.sum(0).to(weight_dtype), None, None, None


def _sm_count(device):
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_cross_entropy(hidden, weight, targets, precision="tf32x3", config=None):
    """Mean cross entropy of (N, d) ``hidden`` against every row of (V, d) ``weight``, over the
    positions whose ``targets`` (N,) are in [0, V) (a negative target: not scored; none scored: 0);
    ``config``: (BLOCK_M, BLOCK_N, num_warps) for the forward and the two-kernel backward, else
    :func:`launch_config`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d) and weight (V, d) must share d, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if config is not None and len(config) != 3:
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, num_warps), got {config!r}")
    return LinearCrossEntropy.apply(hidden, weight, targets, precision, config)
