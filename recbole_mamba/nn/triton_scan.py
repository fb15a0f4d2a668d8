"""Mamba's selective scan as Triton kernels, shaped for recommendation (small d_inner and d_state).

Same arguments and result as mamba-ssm's ``selective_scan_fn`` with real ``A`` and per-batch
``B``/``C`` (what the Mamba block passes)::

    u, delta, z: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)    D, delta_bias: (d,)

One program handles one batch row and a block of ``BLOCK_D`` channels with all ``n`` states.  It
walks the sequence in chunks of ``BLOCK_T`` steps; inside a chunk the recurrence
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` runs step by step in registers (each thread holds every
step of the chunk for its channels and states: see the tile comment below), and the chunk's last state
carries to the next chunk.  Nothing per (step, state) is written to memory: the forward saves no
states at all, and the backward first re-runs the forward to keep only each chunk's starting state,
then walks the chunks in reverse, loading each chunk's inputs while it computes the one before.
Where the batch is too small to fill the GPU, a long sequence is also cut into time segments, one
program each, joined through per-segment summaries (see the comment above
_segment_summary_fwd_kernel).

The slow, obviously correct twin is :func:`recbole_mamba.nn.selective_scan.selective_scan_reference`
(float64); ``tests/test_triton_scan.py`` compares the two (on the CPU through Triton's interpreter,
``TRITON_INTERPRET=1``, and on a GPU compiled).
"""

import functools
import typing

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "scan_forward", "scan_backward", "launch_config"]

# Most memory the backward's chunk-start states may take at once (see scan_backward). At 32 windows of
# 2,048 (d_inner 128, d_state 32) the whole batch would take 256 MiB; 128 MiB runs it in two slices of
# 2,048 programs at the same speed on an H100 (benchmarks/NOTES.md, lifelong row 11).
BACKWARD_SCRATCH_BYTES = 128 * 2**20


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) to within 1e-8 relative, from multiply-adds and one fast exp2 and reciprocal.

    max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1] and log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
    whose odd series to s^17 converges to 1e-8 and keeps full precision for small e (no rounding of
    1 + e).  A full-precision log and division cost more: with them (and tl.sigmoid) the compiled
    forward had 824 instructions instead of 728 (sm_90, tiling (8, 4, 1)).
    """
    e = tl.exp2(tl.abs(x) * -1.4426950408889634)
    s = tl.fdiv(e, 2.0 + e)
    s2 = s * s
    series = 1.0 / 17.0
    for k in tl.static_range(15, 0, -2):
        series = series * s2 + 1.0 / k
    return tl.maximum(x, 0.0) + 2.0 * s * series


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) with the fast exp2 and reciprocal (tl.sigmoid divides at full precision)."""
    return tl.fdiv(1.0, 1.0 + tl.exp2(x * -1.4426950408889634))


# Tiles are 4-D: (time, state_high, channel, state_low), state n = state_high * N_LOW + state_low.
# Splitting the states in two lets Triton keep one part inside each thread and spread the other over
# lanes, next to the channels.  Compiled for an H100 (tiles (4, 4, 8, 8) on one warp), each thread holds
# the chunk's time steps and the N_LOW states: the steps along time are plain register arithmetic, a sum
# over states is 8 in-thread additions and then 2 shuffle rounds, a sum over channels 3 rounds.  With
# (time, channel, state) tiles the states all went on the lanes and every sum over them took 5 rounds
# per value: the backward spent more instructions on lane shuffles than on arithmetic.
# Inputs are loaded as 2-D/3-D tiles and expanded (see _raw_td), which keeps that layout.


@triton.jit
def _sum_states(x):
    """(T, NH, D, NL) -> (T, 1, D, 1): first over state_low (inside each thread, as compiled), then state_high."""
    return tl.sum(tl.sum(x, axis=3, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _pick(x, offs_local, index: tl.constexpr):
    """x at time ``index`` of a (T, NH, D, NL) tile, as (1, NH, D, NL) (register tiles cannot be indexed)."""
    return tl.sum(tl.where(offs_local == index, x, 0.0), axis=0, keep_dims=True)


@triton.jit
def _states_in_chunk(decay, inp, h0, local4, BLOCK_T: tl.constexpr):
    """h_t at every step of a chunk that starts from state h0, as a (T, NH, D, NL) tile.

    A plain loop over the chunk's steps: time is inside each thread, so every pick and placement below
    is a choice of registers, resolved when the kernel is compiled.
    """
    states = tl.zeros(decay.shape, tl.float32)
    h = h0
    for i in tl.static_range(BLOCK_T):
        h = _pick(decay, local4, i) * h + _pick(inp, local4, i)
        states = tl.where(local4 == i, h, states)
    return states


@triton.jit
def _state_grads_in_chunk(decay, dyC, k_next, states, h0, local4, BLOCK_T: tl.constexpr):
    """g_t = dyC_t + a_{t+1} g_{t+1} at every step of a chunk, walking it backwards, a_0 g_0, and
    q_t = a_t g_t h_{t-1}.

    ``k_next`` is a g at the step after the chunk times its decay.  (A reverse ``tl.associative_scan``
    computes the same, but Triton lowers it with hundreds of lane shuffles per chunk.)  h_{t-1} is the
    state one step before (h0 at the chunk's first step), picked from the registers ``states``
    occupies, and a_t g_t is the recurrence's own product: no (T, NH, D, NL) tile of h_{t-1} or of the
    decays has to live past this loop (registers).  Callers that need no q pass any tiles of the
    right shapes as ``states`` and ``h0``: the compiler drops what is not used.
    """
    g = tl.zeros(decay.shape, tl.float32)
    q = tl.zeros(decay.shape, tl.float32)
    k = k_next
    for i in tl.static_range(BLOCK_T - 1, -1, -1):
        g_i = _pick(dyC, local4, i) + k
        g = tl.where(local4 == i, g_i, g)
        k = _pick(decay, local4, i) * g_i
        h_prev = _pick(states, local4, i - 1) if i > 0 else h0
        q = tl.where(local4 == i, k * h_prev, q)
    return g, k, q


@triton.jit
def _raw_td(ptr, offs_t, offs_d, mask_t, mask_d, s_l, s_d):
    """A (time, channel) input as loaded: a float32 (T, D) tile, expanded to (T, 1, D, 1) where used.

    Loading 2-D tiles and expanding them matters: Triton gives a load the layout that coalesces its
    memory accesses (threads along time) and, had the load been 4-D or reshaped, would carry that
    layout to all the arithmetic that uses it.
    """
    x = tl.load(ptr + offs_t[:, None] * s_l + offs_d[None, :] * s_d, mask=mask_t[:, None] & mask_d[None, :],
                other=0.0)
    return x.to(tl.float32)


@triton.jit
def _raw_tn(ptr, offs_t, offs_n, mask_t, mask_n, s_l, s_n, N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """A (time, state) input as loaded: a float32 (T, NH, NL) tile."""
    offs_n3 = tl.arange(0, N_HIGH)[None, :, None] * N_LOW + tl.arange(0, N_LOW)[None, None, :]
    x = tl.load(ptr + offs_t[:, None, None] * s_l + offs_n3 * s_n,
                mask=mask_t[:, None, None] & mask_n.reshape(1, N_HIGH, N_LOW), other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_td(ptr, x, offs_t, offs_d, mask_t, mask_d, s_l, s_d):
    """Store a (T, 1, D, 1) tile at (time, channel) vectors, in the pointer's dtype."""
    x = tl.reshape(x, (offs_t.shape[0], offs_d.shape[0]))
    tl.store(ptr + offs_t[:, None] * s_l + offs_d[None, :] * s_d, x.to(ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _as_tile(x, dim: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """A vector of times (dim 0), states (dim 1) or channels (dim 2) as a 4-D tile that broadcasts."""
    if dim == 0:
        return tl.reshape(x, (x.shape[0], 1, 1, 1))
    elif dim == 1:
        return tl.reshape(x, (1, N_HIGH, 1, N_LOW))
    else:
        return tl.reshape(x, (1, 1, x.shape[0], 1))


@triton.jit
def _scan_loads(u_ptr, delta_ptr, B_ptr, offs_t, offs_d, offs_n, mask_t, mask_d, mask_n, s_ul, s_ud, s_dl, s_dd,
                s_bl, s_bn, N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """delta and u, (T, D), and B, (T, NH, NL), at times ``offs_t``, as loaded (see _decay_and_input).

    Every loop below loads a chunk's inputs one iteration ahead, so that their latency overlaps the
    arithmetic of the chunk before.
    """
    raw = _raw_td(delta_ptr, offs_t, offs_d, mask_t, mask_d, s_dl, s_dd)
    u = _raw_td(u_ptr, offs_t, offs_d, mask_t, mask_d, s_ul, s_ud)
    Bt = _raw_tn(B_ptr, offs_t, offs_n, mask_t, mask_n, s_bl, s_bn, N_HIGH, N_LOW)
    return raw, u, Bt


@triton.jit
def _decay_and_input(raw, u, Bt, bias, A2, mask_t, mask_d, SOFTPLUS: tl.constexpr, N_HIGH: tl.constexpr,
                     N_LOW: tl.constexpr):
    """exp(dt A) and dt u B of a chunk, (T, NH, D, NL) tiles, from its delta and u, (T, D), and B, (T, NH, NL).

    Also dt, u and dt u, (T, 1, D, 1), B_t, (T, NH, 1, NL), and d dt / d delta, (T, 1, D, 1) (1.0 without
    softplus).  dt = 0 at padding steps and channels, which makes them the identity (decay 1, input 0).
    The per-(time, channel) arithmetic runs on the (T, D) tiles as loaded, one value per thread, before
    they are spread over the (T, NH, D, NL) layout, where each would be computed once per state lane.
    """
    raw = raw + bias[None, :]
    dt = _softplus(raw) if SOFTPLUS else raw
    dt = tl.where(mask_t[:, None] & mask_d[None, :], dt, 0.0)
    slope = _sigmoid(raw)[:, None, :, None] if SOFTPLUS else 1.0  # softplus' = sigmoid
    dtu = (dt * u)[:, None, :, None]
    dt = dt[:, None, :, None]
    Bt = Bt[:, :, None, :]
    decay = tl.exp2(dt * A2)
    inp = dtu * Bt
    return decay, inp, dt, u[:, None, :, None], dtu, Bt, slope


@triton.jit
def _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """The channels (1, 1, D, 1) and states (1, NH, 1, NL) as tiles, the channel mask, and the mask of
    real (channel, state) pairs (1, NH, D, NL): the indices of per-(channel, state) values."""
    mask_d4 = _as_tile(mask_d, 2, N_HIGH, N_LOW)
    return (_as_tile(offs_d, 2, N_HIGH, N_LOW), _as_tile(offs_n, 1, N_HIGH, N_LOW), mask_d4,
            mask_d4 & _as_tile(mask_n, 1, N_HIGH, N_LOW))


@triton.jit
def _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, mask_d, mask_n, N, HAS_BIAS: tl.constexpr,
                    HAS_D: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """A and A * log2(e) as (1, NH, D, NL), delta_bias as (D,) and D as (1, 1, D, 1), float32.

    exp(dt A) = exp2(dt A2); padded states get A = 0 (decay 1, input 0); absent bias and D are zeros.
    """
    d4, n4, mask_d4, mask_dn4 = _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH, N_LOW)
    A = tl.load(A_ptr + d4 * N + n4, mask=mask_dn4, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0 * offs_d
    Dv = tl.load(D_ptr + d4, mask=mask_d4, other=0.0).to(tl.float32) if HAS_D else 0.0 * d4
    return A, A * 1.4426950408889634, bias, Dv


@triton.jit
def _program_setup(A_ptr, bias_ptr, D_ptr, DIM, N, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
                   BLOCK_D: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's channels, states and chunk steps (vectors, and the steps as a tile), their masks,
    and its channels' parameters (see _channel_params)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_HIGH * N_LOW)
    offs_local = tl.arange(0, BLOCK_T)
    mask_d, mask_n = offs_d < DIM, offs_n < N
    A, A2, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, mask_d, mask_n, N, HAS_BIAS, HAS_D,
                                      N_HIGH, N_LOW)
    return offs_d, offs_n, offs_local, _as_tile(offs_local, 0, N_HIGH, N_LOW), mask_d, mask_n, A, A2, bias, Dv


@triton.jit
def _forward_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, offs_t, offs_d, offs_n, mask_t, mask_d, mask_n, s_ul, s_ud,
                   s_dl, s_dd, s_bl, s_bn, s_cl, s_cn, s_zl, s_zd, HAS_Z: tl.constexpr, N_HIGH: tl.constexpr,
                   N_LOW: tl.constexpr):
    """The forward's inputs at times ``offs_t``, as loaded: (T, D) and (T, NH, NL) float32 tiles."""
    raw, u, B = _scan_loads(u_ptr, delta_ptr, B_ptr, offs_t, offs_d, offs_n, mask_t, mask_d, mask_n, s_ul, s_ud, s_dl,
                            s_dd, s_bl, s_bn, N_HIGH, N_LOW)
    C = _raw_tn(C_ptr, offs_t, offs_n, mask_t, mask_n, s_cl, s_cn, N_HIGH, N_LOW)
    z = _raw_td(z_ptr, offs_t, offs_d, mask_t, mask_d, s_zl, s_zd) if HAS_Z else u
    return raw, u, B, C, z


@triton.jit
def _pass2_loads(delta_ptr, u_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, offs_t, offs_d, offs_n, mask_t, mask_d, mask_n,
                 s_dl, s_dd, s_ul, s_ud, s_bl, s_bn, s_cl, s_cn, s_gl, s_gd, s_zl, s_zd, HAS_Z: tl.constexpr,
                 N_HIGH: tl.constexpr, N_LOW: tl.constexpr):
    """The backward's inputs at times ``offs_t``, as loaded: (T, D) and (T, NH, NL) float32 tiles."""
    raw, u, B = _scan_loads(u_ptr, delta_ptr, B_ptr, offs_t, offs_d, offs_n, mask_t, mask_d, mask_n, s_ul, s_ud, s_dl,
                            s_dd, s_bl, s_bn, N_HIGH, N_LOW)
    C = _raw_tn(C_ptr, offs_t, offs_n, mask_t, mask_n, s_cl, s_cn, N_HIGH, N_LOW)
    dy = _raw_td(dout_ptr, offs_t, offs_d, mask_t, mask_d, s_gl, s_gd)
    z = _raw_td(z_ptr, offs_t, offs_d, mask_t, mask_d, s_zl, s_zd) if HAS_Z else dy
    return raw, u, B, C, dy, z


@triton.jit
def _segment_bounds(L, SEG_CHUNKS, BLOCK_T: tl.constexpr):
    """This program's segment (program_id 2) as chunk indices [begin, end), and the number of segments."""
    seg = tl.program_id(2)
    n_chunks = (L + BLOCK_T - 1) // BLOCK_T
    begin = seg * SEG_CHUNKS
    return seg, begin, tl.minimum(begin + SEG_CHUNKS, n_chunks)


@triton.jit
def _state_before_segment(hloc_ptr, sdt_ptr, seg, A2, d4, n4, mask_d4, mask_dn4, DIM, N):
    """The state entering segment ``seg``, from the summaries of the segments before it.

    A segment maps a state h to P h + hloc, with hloc its last state when started from 0 and
    P = exp(A sum(dt)) the product of its decays, so h <- P_j h + hloc_j over j = 0 .. seg - 1.
    """
    h = A2 * 0.0
    j = 0
    while j < seg:
        decay = tl.exp2(A2 * tl.load(sdt_ptr + j * DIM + d4, mask=mask_d4, other=0.0))
        h = decay * h + tl.load(hloc_ptr + j * DIM * N + d4 * N + n4, mask=mask_dn4, other=0.0)
        j += 1
    return h


@triton.jit
def _adjoint_after_segment(klocal_ptr, sdt_ptr, seg, n_seg, A2, d4, n4, mask_d4, mask_dn4, DIM, N):
    """k (a g, see _scan_bwd_kernel) entering segment ``seg`` from its end: the backward's mirror of
    _state_before_segment, k <- P_j k + klocal_j over j = n_seg - 1 down to seg + 1."""
    k = A2 * 0.0
    j = n_seg - 1
    while j > seg:
        decay = tl.exp2(A2 * tl.load(sdt_ptr + j * DIM + d4, mask=mask_d4, other=0.0))
        k = decay * k + tl.load(klocal_ptr + j * DIM * N + d4 * N + n4, mask=mask_dn4, other=0.0)
        j -= 1
    return k


@triton.jit
def _states_over_chunks(h, c_begin, c_end, u_ptr, delta_ptr, B_ptr, bias, A2, offs_local, local4, offs_d, offs_n,
                        mask_d, mask_n, L, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, starts_ptr, tile_index,
                        STORE_STARTS: tl.constexpr, SUM_DT: tl.constexpr, SOFTPLUS: tl.constexpr,
                        BLOCK_D: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr, BLOCK_T: tl.constexpr):
    """The recurrence from state h over chunks [c_begin, c_end): the state after them and (SUM_DT) the
    sum of dt per channel, (1, NH, D, NL) and (1, 1, D, 1).  STORE_STARTS: write each chunk's starting
    state to ``starts_ptr`` (tile ``c - c_begin``)."""
    tile_size: tl.constexpr = N_HIGH * BLOCK_D * N_LOW
    sum_dt = tl.zeros([1, 1, BLOCK_D, 1], tl.float32)
    offs_t = c_begin * BLOCK_T + offs_local
    n_raw, n_u, n_B = _scan_loads(u_ptr, delta_ptr, B_ptr, offs_t, offs_d, offs_n, offs_t < L, mask_d, mask_n, s_ul,
                                  s_ud, s_dl, s_dd, s_bl, s_bn, N_HIGH, N_LOW)
    c = c_begin
    while c < c_end:
        offs_t = c * BLOCK_T + offs_local
        mask_t = offs_t < L
        if STORE_STARTS:
            tl.store(starts_ptr + (c - c_begin) * tile_size + tile_index, h)
        raw2, u2, B3 = n_raw, n_u, n_B
        n_raw, n_u, n_B = _scan_loads(u_ptr, delta_ptr, B_ptr, offs_t + BLOCK_T, offs_d, offs_n, offs_t + BLOCK_T < L,
                                      mask_d, mask_n, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, N_HIGH, N_LOW)
        decay, inp, dt, u, dtu, Bt, slope = _decay_and_input(raw2, u2, B3, bias, A2, mask_t, mask_d, SOFTPLUS,
                                                             N_HIGH, N_LOW)
        states = _states_in_chunk(decay, inp, h, local4, BLOCK_T)
        # Padding steps are the identity, so the chunk's last slot holds the state after its last real step.
        h = _pick(states, local4, BLOCK_T - 1)
        if SUM_DT:
            sum_dt += tl.sum(dt, axis=0, keep_dims=True)
        c += 1
    return h, sum_dt


# Long sequences in small batches give fewer (batch row, channel block) programs than the GPU runs
# at once.  Then the sequence is also split into segments of SEG_CHUNKS chunks, one program each, in
# two launches.  The recurrence is linear, so a segment maps its entering state h to P h + hloc (P the
# product of its decays, hloc its last state when started from zero): the first launch computes every
# segment's (hloc, sum of dt) (_segment_summary_fwd_kernel); the second runs each segment from the
# state those summaries give (_state_before_segment).  The backward does the same for the gradient
# g, which runs from the end: _segment_summary_bwd_kernel, then _adjoint_after_segment.


@triton.jit
def _segment_summary_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, hloc_ptr, sdt_ptr,
    L, DIM, N, SEG_CHUNKS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bn, s_bl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_HIGH: tl.constexpr,
    N_LOW: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Each segment's last state from zero and sum of dt: hloc (batch, segments, DIM, N), sdt (batch, segments, DIM)."""
    b = tl.program_id(0)
    offs_d, offs_n, offs_local, local4, mask_d, mask_n, A, A2, bias, no_D = _program_setup(
        A_ptr, bias_ptr, A_ptr, DIM, N, HAS_BIAS, False, BLOCK_D, N_HIGH, N_LOW, BLOCK_T)
    seg, c_begin, c_end = _segment_bounds(L, SEG_CHUNKS, BLOCK_T)
    h, sum_dt = _states_over_chunks(A2 * 0.0, c_begin, c_end, u_ptr + b * s_ub, delta_ptr + b * s_db, B_ptr + b * s_bb,
                                    bias, A2, offs_local, local4, offs_d, offs_n, mask_d, mask_n, L, s_ul, s_ud, s_dl,
                                    s_dd, s_bl, s_bn, hloc_ptr, 0, False, True, SOFTPLUS, BLOCK_D, N_HIGH, N_LOW,
                                    BLOCK_T)
    d4, n4, mask_d4, mask_dn4 = _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH, N_LOW)
    row = b * tl.num_programs(2) + seg
    tl.store(hloc_ptr + (row * DIM + d4) * N + n4, h, mask=mask_dn4)
    tl.store(sdt_ptr + row * DIM + d4, sum_dt, mask=mask_d4)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, hloc_ptr, sdt_ptr,
    L, DIM, N, SEG_CHUNKS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_LAST: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_D: tl.constexpr, N_HIGH: tl.constexpr,
    N_LOW: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    offs_d, offs_n, offs_local, local4, mask_d, mask_n, A, A2, bias, Dv = _program_setup(
        A_ptr, bias_ptr, D_ptr, DIM, N, HAS_BIAS, HAS_D, BLOCK_D, N_HIGH, N_LOW, BLOCK_T)
    d4, n4, mask_d4, mask_dn4 = _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH, N_LOW)
    seg, c_begin, c_end = _segment_bounds(L, SEG_CHUNKS, BLOCK_T)
    n_seg = tl.num_programs(2)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    B_ptr += b * s_bb
    C_ptr += b * s_cb
    z_ptr += b * s_zb
    out_ptr += b * s_ob
    h = A2 * 0.0
    if SEGMENTED:
        h = _state_before_segment(hloc_ptr + b * n_seg * DIM * N, sdt_ptr + b * n_seg * DIM, seg, A2, d4, n4,
                                  mask_d4, mask_dn4, DIM, N)
    t0 = c_begin * BLOCK_T
    t_end = c_end * BLOCK_T
    offs_t = t0 + offs_local
    mask_t = offs_t < L
    n_raw, n_u, n_B, n_C, n_z = _forward_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, offs_t, offs_d, offs_n, mask_t,
                                               mask_d, mask_n, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, s_cl, s_cn, s_zl,
                                               s_zd, HAS_Z, N_HIGH, N_LOW)
    while t0 < t_end:  # (a while loop: Triton's interpreter cannot range() over a runtime length with numpy 2)
        offs_t = t0 + offs_local
        mask_t = offs_t < L
        raw2, u2, B3, C3, z2 = n_raw, n_u, n_B, n_C, n_z
        offs_next = offs_t + BLOCK_T
        mask_next = offs_next < L
        n_raw, n_u, n_B, n_C, n_z = _forward_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, offs_next, offs_d, offs_n,
                                                   mask_next, mask_d, mask_n, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, s_cl,
                                                   s_cn, s_zl, s_zd, HAS_Z, N_HIGH, N_LOW)
        decay, inp, dt, u, dtu, Bt, slope = _decay_and_input(raw2, u2, B3, bias, A2, mask_t, mask_d, SOFTPLUS,
                                                             N_HIGH, N_LOW)
        states = _states_in_chunk(decay, inp, h, local4, BLOCK_T)
        y = _sum_states(states * C3[:, :, None, :])
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            y *= (z2 * _sigmoid(z2))[:, None, :, None]  # silu(z), on the (T, D) tile as loaded
        _store_td(out_ptr, y, offs_t, offs_d, mask_t, mask_d, s_ol, s_od)
        # Padding steps are the identity, so the chunk's last slot holds the state after its last real step.
        h = _pick(states, local4, BLOCK_T - 1)
        t0 += BLOCK_T
    if STORE_LAST:  # by the last segment, whose h is the state after step L - 1
        tl.store(last_ptr + b * DIM * N + d4 * N + n4, h, mask=mask_dn4 & (n4 * 0 + seg == n_seg - 1))


@triton.jit
def _segment_summary_bwd_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, klocal_ptr,
    L, DIM, N, SEG_CHUNKS,
    s_db, s_dd, s_dl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
    N_HIGH: tl.constexpr, N_LOW: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Each segment's k at its first step with zero coming in from its end: klocal (batch, segments, DIM, N).

    (Only g's recurrence, g_t = dy_t C_t + a_{t+1} g_{t+1}: no states and no gradients.)
    """
    b = tl.program_id(0)
    offs_d, offs_n, offs_local, local4, mask_d, mask_n, A, A2, bias, no_D = _program_setup(
        A_ptr, bias_ptr, A_ptr, DIM, N, HAS_BIAS, False, BLOCK_D, N_HIGH, N_LOW, BLOCK_T)
    seg, c_begin, c_end = _segment_bounds(L, SEG_CHUNKS, BLOCK_T)
    delta_ptr += b * s_db
    C_ptr += b * s_cb
    z_ptr += b * s_zb
    dout_ptr += b * s_gb
    k = A2 * 0.0
    c = c_end - 1
    while c >= c_begin:
        offs_t = c * BLOCK_T + offs_local
        mask_t = offs_t < L
        raw = _raw_td(delta_ptr, offs_t, offs_d, mask_t, mask_d, s_dl, s_dd)
        C3 = _raw_tn(C_ptr, offs_t, offs_n, mask_t, mask_n, s_cl, s_cn, N_HIGH, N_LOW)
        dy = _raw_td(dout_ptr, offs_t, offs_d, mask_t, mask_d, s_gl, s_gd)
        if HAS_Z:
            z = _raw_td(z_ptr, offs_t, offs_d, mask_t, mask_d, s_zl, s_zd)
            dy = dy * z * _sigmoid(z)
        # Only the decay is used (raw and C stand in for u and B).
        decay, inp, dt, u4, dtu, Bt, slope = _decay_and_input(raw, raw, C3, bias, A2, mask_t, mask_d, SOFTPLUS,
                                                              N_HIGH, N_LOW)
        g, k, _ = _state_grads_in_chunk(decay, dy[:, None, :, None] * C3[:, :, None, :], k, decay, k, local4,
                                        BLOCK_T)
        c -= 1
    d4, n4, mask_d4, mask_dn4 = _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH, N_LOW)
    tl.store(klocal_ptr + ((b * tl.num_programs(2) + seg) * DIM + d4) * N + n4, k, mask=mask_dn4)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, chunk_h0_ptr, hloc_ptr, sdt_ptr, klocal_ptr,
    L, DIM, N, SEG_CHUNKS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl,
    s_gb, s_gd, s_gl, s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SEGMENTED: tl.constexpr, BLOCK_D: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Gradients, with g_t = dLoss/dh_t, a_t = exp(dt_t A), dy_t the gradient of y_t before D and the gate:
    #   g_t = dy_t C_t + a_{t+1} g_{t+1}
    #   dC_t = sum_d dy_t h_t    dB_t = sum_d g_t dt_t u_t    dx_t = sum_n g_t B_t
    #   q_t = g_t a_t h_{t-1}    d dt_t = sum_n q_t A + dx_t u_t    dA = sum_{b,t} q_t dt_t
    #   du_t = dx_t dt_t + dy_t D
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d, offs_n, offs_local, local4, mask_d, mask_n, A, A2, bias, Dv = _program_setup(
        A_ptr, bias_ptr, D_ptr, DIM, N, HAS_BIAS, HAS_D, BLOCK_D, N_HIGH, N_LOW, BLOCK_T)
    d4, n4, mask_d4, mask_dn4 = _channel_state_tiles(offs_d, offs_n, mask_d, mask_n, N_HIGH, N_LOW)
    seg, c_begin, c_end = _segment_bounds(L, SEG_CHUNKS, BLOCK_T)
    n_seg = tl.num_programs(2)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    B_ptr += b * s_bb
    C_ptr += b * s_cb
    z_ptr += b * s_zb
    dout_ptr += b * s_gb
    # dB, dC are contiguous (batch, L, n) float32.
    du_ptr += b * s_dub
    ddelta_ptr += b * s_ddb
    dz_ptr += b * s_dzb
    dB_ptr += b * N * L
    dC_ptr += b * N * L
    # This program's chunk-start states: (SEG_CHUNKS, NH, BLOCK_D, NL), float32.
    tile_size: tl.constexpr = N_HIGH * BLOCK_D * N_LOW
    chunk_h0_ptr += ((b * tl.num_programs(1) + pid_d) * n_seg + seg) * SEG_CHUNKS * tile_size
    tile_index = (n4 // N_LOW * BLOCK_D + (d4 - pid_d * BLOCK_D)) * N_LOW + n4 % N_LOW

    # Pass 1: re-run the forward over this segment, keeping only the state before each chunk.
    h0 = A2 * 0.0
    if SEGMENTED:
        h0 = _state_before_segment(hloc_ptr + b * n_seg * DIM * N, sdt_ptr + b * n_seg * DIM, seg, A2, d4, n4,
                                   mask_d4, mask_dn4, DIM, N)
    _states_over_chunks(h0, c_begin, c_end, u_ptr, delta_ptr, B_ptr, bias, A2, offs_local, local4, offs_d, offs_n,
                        mask_d, mask_n, L, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, chunk_h0_ptr, tile_index, True, False,
                        SOFTPLUS, BLOCK_D, N_HIGH, N_LOW, BLOCK_T)
    # Pass 2 may read a chunk state that another thread of this program wrote.
    tl.debug_barrier()

    # Pass 2: the segment's chunks in reverse, from the g that the segments after it pass back.
    k_next = A2 * 0.0
    if SEGMENTED:
        k_next = _adjoint_after_segment(klocal_ptr + b * n_seg * DIM * N, sdt_ptr + b * n_seg * DIM, seg, n_seg, A2,
                                        d4, n4, mask_d4, mask_dn4, DIM, N)
    dA_acc = tl.zeros([1, N_HIGH, BLOCK_D, N_LOW], tl.float32)
    dD_acc = tl.zeros([1, 1, BLOCK_D, 1], tl.float32)
    c = c_end - 1
    offs_t = c * BLOCK_T + offs_local
    mask_t = offs_t < L
    n_raw, n_u, n_B, n_C, n_dy, n_z = _pass2_loads(delta_ptr, u_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, offs_t, offs_d,
                                                   offs_n, mask_t, mask_d, mask_n, s_dl, s_dd, s_ul, s_ud, s_bl, s_bn,
                                                   s_cl, s_cn, s_gl, s_gd, s_zl, s_zd, HAS_Z, N_HIGH, N_LOW)
    n_h0 = tl.load(chunk_h0_ptr + (c - c_begin) * tile_size + tile_index)
    while c >= c_begin:
        offs_t = c * BLOCK_T + offs_local
        mask_t = offs_t < L
        raw2, u2, B3, C3, dy2, z2, h0 = n_raw, n_u, n_B, n_C, n_dy, n_z, n_h0
        # The previous chunk's inputs, loaded now so that their latency overlaps this chunk's arithmetic.
        offs_p = offs_t - BLOCK_T
        n_raw, n_u, n_B, n_C, n_dy, n_z = _pass2_loads(delta_ptr, u_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, offs_p, offs_d,
                                                       offs_n, offs_p >= 0, mask_d, mask_n, s_dl, s_dd, s_ul, s_ud,
                                                       s_bl, s_bn, s_cl, s_cn, s_gl, s_gd, s_zl, s_zd, HAS_Z, N_HIGH,
                                                       N_LOW)
        offs_h0 = (c - 1 - c_begin) * tile_size + tile_index  # negative at the segment's first chunk
        n_h0 = tl.load(chunk_h0_ptr + offs_h0, mask=offs_h0 >= 0, other=0.0)
        decay, inp, dt, u, dtu, Bt, slope = _decay_and_input(raw2, u2, B3, bias, A2, mask_t, mask_d, SOFTPLUS,
                                                             N_HIGH, N_LOW)
        # h_t for every step of the chunk.
        states = _states_in_chunk(decay, inp, h0, local4, BLOCK_T)

        Ct = C3[:, :, None, :]
        if HAS_Z:
            y = _sum_states(states * Ct)
            if HAS_D:
                y += Dv * u
            # On the (T, D) tiles as loaded: silu'(z) = sig (1 + z (1 - sig)), and the gradient through the gate.
            sig = _sigmoid(z2)
            dz = y * (dy2 * sig * (1.0 + z2 * (1.0 - sig)))[:, None, :, None]
            _store_td(dz_ptr, dz, offs_t, offs_d, mask_t, mask_d, s_dzl, s_dzd)
            dy2 = dy2 * z2 * sig
        dy = dy2[:, None, :, None]
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=0, keep_dims=True)

        # Backwards through the chunk: g_t = dy_t C_t + k_{t+1} with k_t = a_t g_t; k_next is k at the
        # following chunk's first step.
        g, k_next, q = _state_grads_in_chunk(decay, dy * Ct, k_next, states, h0, local4, BLOCK_T)

        tn_offsets = offs_t[:, None] * N + offs_n[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        dC = tl.reshape(tl.sum(dy * states, axis=2), (BLOCK_T, N_HIGH * N_LOW))
        # Relaxed: the sums need no ordering, and the default (acq_rel) fences every add and empties L1.
        tl.atomic_add(dC_ptr + tn_offsets, dC, mask=mask_tn, sem="relaxed")
        dB = tl.reshape(tl.sum(g * dtu, axis=2), (BLOCK_T, N_HIGH * N_LOW))
        tl.atomic_add(dB_ptr + tn_offsets, dB, mask=mask_tn, sem="relaxed")
        dA_acc += tl.sum(q * dt, axis=0, keep_dims=True)
        dx = _sum_states(g * Bt)
        d_dt = _sum_states(q * A) + dx * u
        du = dx * dt
        if HAS_D:
            du += dy * Dv
        d_dt = d_dt * slope
        _store_td(du_ptr, du, offs_t, offs_d, mask_t, mask_d, s_dul, s_dud)
        _store_td(ddelta_ptr, d_dt, offs_t, offs_d, mask_t, mask_d, s_ddl, s_ddd)
        c -= 1
    # Partial sums of dA and dD per batch row and segment (summed outside: deterministic, and small).
    row = b * n_seg + seg
    tl.store(dA_ptr + row * DIM * N + d4 * N + n4, dA_acc, mask=mask_dn4)
    if HAS_D:
        tl.store(dD_ptr + row * DIM + d4, dD_acc, mask=mask_d4)


def launch_config(d, n, L, batch=None):
    """(BLOCK_D, BLOCK_T, num_warps, segments, forward BLOCK_D, forward num_warps) for a shape, from the
    tilings timed on an H100 (benchmarks/NOTES.md).

    The backward: one warp per program, chunks of 4 steps, 8 channels: the fastest at (2048, 200),
    (256, 512) and (64, 2048) with d_inner 128 and d_state 32.  Where that gives too few programs to
    fill the GPU (small batches), long sequences are cut into time segments (see
    _segment_summary_fwd_kernel) until there are about TARGET_PROGRAMS programs, each segment at least
    MIN_SEGMENT_CHUNKS chunks long; short ones get 4 channels per program instead.

    The forward keeps half the backward's registers live, so its programs take more channels: 32 on
    two warps where that still gives TARGET_PROGRAMS programs (large batches), else 16 on one (timed
    with up to 32 states; with more, which fill its registers, it is tiled as the backward).  Its
    chunks and segments are the backward's (the backward reuses the forward's segment summaries).
    """
    block_t = min(4, triton.next_power_of_2(L))
    rows = batch or TARGET_PROGRAMS
    programs = rows * triton.cdiv(d, 8)
    max_segments = triton.cdiv(L, block_t) // MIN_SEGMENT_CHUNKS
    if programs >= TARGET_PROGRAMS // 4:
        block_d, segments = 8, 1
    elif max_segments >= 2:
        block_d, segments = 8, min(triton.cdiv(TARGET_PROGRAMS, programs), max_segments)
    else:
        block_d, segments = 4, 1
    if n > 32:
        forward = (block_d, 1)
    else:
        forward = (32, 2) if rows * triton.cdiv(d, 32) >= TARGET_PROGRAMS else (16, 1)
    return (block_d, block_t, 1, segments) + forward


def _full_config(config):
    """A config of 3, 4 or 6 values (see launch_config) with the defaults filled in: one segment, and
    the forward tiled as the backward."""
    if len(config) not in (3, 4, 6):
        raise ValueError(f"config must be (BLOCK_D, BLOCK_T, num_warps[, segments[, forward BLOCK_D, forward "
                         f"num_warps]]): 3, 4 or 6 values, got {tuple(config)!r}.")
    block_d, block_t, warps, *rest = config
    segments = rest[0] if rest else 1
    fwd_block_d, fwd_warps = rest[1:] if len(rest) == 3 else (block_d, warps)
    return block_d, block_t, warps, segments, fwd_block_d, fwd_warps


# Programs that fill an H100 with one-warp programs, and the shortest segment worth its extra work.
TARGET_PROGRAMS = 4096
MIN_SEGMENT_CHUNKS = 32


def state_split(n):
    """(N_HIGH, N_LOW): the states as N_HIGH in-thread values times N_LOW lanes (see the tile comment)."""
    block_n = triton.next_power_of_2(n)
    n_low = min(8, block_n)
    return block_n // n_low, n_low


def _batch_rows(t, part, absent):
    """Rows ``part`` of a per-batch-row tensor; ``absent``'s stand in for a missing one (never read)."""
    return (t if t is not None else absent)[part]


def _channels_last(batch, d, L, like):
    """An empty (batch, d, L) tensor stored as (batch, L, d): what a Mamba block's out_proj reads
    (y.transpose(1, 2)) and in_proj's backward writes, so neither needs a copy."""
    return torch.empty((batch, L, d), device=like.device, dtype=like.dtype).transpose(1, 2)


def _segments(L, block_t, segments):
    """(segments, chunks per segment) with no empty segment."""
    n_chunks = triton.cdiv(L, block_t)
    seg_chunks = triton.cdiv(n_chunks, max(1, min(segments, n_chunks)))
    return triton.cdiv(n_chunks, seg_chunks), seg_chunks


class ScanSaved(typing.NamedTuple):
    """What :func:`scan_backward` needs from :func:`scan_forward` besides the scan's inputs."""

    hloc: torch.Tensor | None  # per-segment summaries; None with one segment
    sdt: torch.Tensor | None
    delta_softplus: bool
    launch: tuple  # (BLOCK_D, BLOCK_T, num_warps, segments, chunks per segment) of the backward


def scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False, config=None):
    """The scan's output (and last state, or None), without autograd: ``(out, last, saved)``, ``saved``
    for :func:`scan_backward`. A, D and delta_bias float32; see :func:`selective_scan_triton`."""
    batch, d, L = u.shape
    n = A.shape[1]
    config = _full_config(config or launch_config(d, n, L, batch))
    block_d, block_t, warps, segments, fwd_block_d, fwd_warps = config
    n_seg, seg_chunks = _segments(L, block_t, segments)
    n_high, n_low = state_split(n)
    fwd_blocks = triton.cdiv(d, fwd_block_d)
    out = _channels_last(batch, d, L, u)
    last = torch.empty((batch, d, n), device=u.device, dtype=torch.float32) if return_last_state else out
    dummy = u  # stands in for absent optional tensors (never read: the flags are off)
    # Segment summaries: each one's last state from zero (batch, segments, d, n) and sum of dt.
    hloc = torch.empty((batch, n_seg, d, n), device=u.device, dtype=torch.float32) if n_seg > 1 else None
    sdt = torch.empty((batch, n_seg, d), device=u.device, dtype=torch.float32) if n_seg > 1 else None
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), BLOCK_D=fwd_block_d,
                 N_HIGH=n_high, N_LOW=n_low, BLOCK_T=block_t, num_warps=fwd_warps)
    bias = delta_bias if delta_bias is not None else dummy
    if n_seg > 1:
        _segment_summary_fwd_kernel[(batch, fwd_blocks, n_seg)](
            u, delta, A, B, bias, hloc, sdt, L, d, n, seg_chunks,  # segmented: neither is None
            *u.stride(), *delta.stride(), *B.stride(), **flags)
    _scan_fwd_kernel[(batch, fwd_blocks, n_seg)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        bias, out, last, hloc if hloc is not None else dummy, sdt if sdt is not None else dummy,
        L, d, n, seg_chunks,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *(z if z is not None else u).stride(),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, STORE_LAST=bool(return_last_state), SEGMENTED=n_seg > 1,
        **flags,
    )
    saved = ScanSaved(hloc, sdt, bool(delta_softplus), (block_d, block_t, warps, n_seg, seg_chunks))
    return out, (last if return_last_state else None), saved


def scan_backward(saved, dout, u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Gradients of the scan's output (given ``dout``) with respect to
    ``(u, delta, A, B, C, D, z, delta_bias)`` (None for an absent input), in their dtypes."""
    hloc, sdt = saved.hloc, saved.sdt
    batch, d, L = u.shape
    n = A.shape[1]
    block_d, block_t, warps, n_seg, seg_chunks = saved.launch
    n_high, n_low = state_split(n)
    d_blocks = triton.cdiv(d, block_d)
    # du channels-last whatever u's strides (at length 1 they are ambiguous): causal-conv1d's backward
    # needs that layout.
    du, ddelta = _channels_last(batch, d, L, u), torch.empty_like(delta)
    dz = _channels_last(batch, d, L, z) if z is not None else None
    # (batch, L, n), returned as (batch, n, L) views: the kernel adds a time step's n values at once.
    dB = torch.zeros((batch, L, n), device=u.device, dtype=torch.float32)
    dC = torch.zeros((batch, L, n), device=u.device, dtype=torch.float32)
    dA = torch.empty((batch, n_seg, d, n), device=u.device, dtype=torch.float32)
    dD = torch.empty((batch, n_seg, d), device=u.device, dtype=torch.float32) if D is not None else None
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=saved.delta_softplus,
                 BLOCK_D=block_d, N_HIGH=n_high, N_LOW=n_low, BLOCK_T=block_t, num_warps=warps)
    bias = delta_bias if delta_bias is not None else u
    klocal = hloc
    if n_seg > 1:  # each segment's g passed back to the one before it, with zero from its end
        klocal = torch.empty((batch, n_seg, d, n), device=u.device, dtype=torch.float32)
        z_or_u = z if z is not None else u
        _segment_summary_bwd_kernel[(batch, d_blocks, n_seg)](
            delta, A, C, z_or_u, bias, dout, klocal, L, d, n, seg_chunks,
            *delta.stride(), *C.stride(), *z_or_u.stride(), *dout.stride(), **flags)
    # The chunk-start states (d_blocks x segments x seg_chunks tiles per batch row) are scratch that
    # grows with batch x L: the kernel runs over slices of the batch that share one buffer of at
    # most BACKWARD_SCRATCH_BYTES, each slice still thousands of programs.
    row_floats = d_blocks * n_seg * seg_chunks * block_d * n_high * n_low
    rows = max(1, min(batch, BACKWARD_SCRATCH_BYTES // (4 * row_floats)))
    chunk_h0 = torch.empty((rows * row_floats,), device=u.device, dtype=torch.float32)
    for start in range(0, batch, rows):
        part = slice(start, start + rows)
        rows_of = functools.partial(_batch_rows, part=part, absent=u)
        z_part, dz_part = rows_of(z), rows_of(dz)
        _scan_bwd_kernel[(rows_of(u).shape[0], d_blocks, n_seg)](
            rows_of(u), rows_of(delta), A, rows_of(B), rows_of(C), D if D is not None else u, z_part,
            bias, rows_of(dout),
            rows_of(du), rows_of(ddelta), dz_part, rows_of(dB), rows_of(dC), rows_of(dA), rows_of(dD), chunk_h0,
            rows_of(hloc), rows_of(sdt), rows_of(klocal),
            L, d, n, seg_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_part.stride(),
            *dout.stride(), *du.stride(), *ddelta.stride(), *dz_part.stride(),
            HAS_D=D is not None, SEGMENTED=n_seg > 1, **flags,
        )
    ddelta_bias = ddelta.float().sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    dD = dD.sum((0, 1)).to(D.dtype) if D is not None else None
    return (du, ddelta, dA.sum((0, 1)).to(A.dtype), dB.transpose(1, 2).to(B.dtype), dC.transpose(1, 2).to(C.dtype),
            dD, dz, ddelta_bias)


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, config):
        out, last, saved = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                        config)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved.hloc, saved.sdt)
        ctx.delta_softplus, ctx.launch = saved.delta_softplus, saved.launch  # tensors only through save_for_backward
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *_dlast):
        u, delta, A, B, C, D, z, delta_bias, hloc, sdt = ctx.saved_tensors
        saved = ScanSaved(hloc, sdt, ctx.delta_softplus, ctx.launch)
        return (*scan_backward(saved, dout, u, delta, A, B, C, D, z, delta_bias), None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, config=None):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` arguments, as Triton kernels.

    Inputs may be float32, float16 or bfloat16 and non-contiguous along any axis (strides are
    passed to the kernels); the arithmetic is float32 and the output has u's dtype. A must be real
    (d, n) and B, C (batch, n, L). ``config`` = (BLOCK_D, BLOCK_T, num_warps[, segments[, forward
    BLOCK_D, forward num_warps]]) overrides :func:`launch_config` (for benchmarks and tests).
    With ``return_last_state`` returns ``(out, last_state)``, last_state (batch, d, n) float32, not
    differentiated.
    """
    if A.is_complex() or B.dim() != 3 or C.dim() != 3:
        raise NotImplementedError("selective_scan_triton: needs real A and B, C of shape (batch, n, L)")
    return _TritonSelectiveScan.apply(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                                      None if delta_bias is None else delta_bias.float(),
                                      delta_softplus, return_last_state, config)
