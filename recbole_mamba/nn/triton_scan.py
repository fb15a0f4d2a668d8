"""Mamba's selective scan as Triton kernels, shaped for recommendation (small d_inner and d_state).

Same arguments and result as mamba-ssm's ``selective_scan_fn`` with real ``A`` and per-batch
``B``/``C`` (what the Mamba block passes)::

    u, delta, z: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)    D, delta_bias: (d,)

One program handles one batch row and a block of ``BLOCK_D`` channels with all ``n`` states.  It
walks the sequence in chunks of ``BLOCK_T`` steps; inside a chunk the recurrence
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` is an associative scan over the chunk's
(BLOCK_D, n, BLOCK_T) tile, all in registers, and the chunk's last state carries to the next chunk.
Nothing per (step, state) is written to memory: the forward saves no states at all, and the backward
first re-runs the forward to keep only each chunk's starting state, then walks the chunks in reverse.

The slow, obviously correct twin is :func:`recbole_mamba.nn.selective_scan.selective_scan_reference`
(float64); ``tests/test_triton_scan.py`` compares the two (on the CPU through Triton's interpreter,
``TRITON_INTERPRET=1``, and on a GPU compiled).
"""

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "launch_config"]

_LOG2_E = 1.4426950408889634


@triton.jit
def _linear_combine(a_left, b_left, a_right, b_right):
    # Two steps h -> a*h + b, the left one first: h -> a_r * (a_l * h + b_l) + b_r.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _linear_combine_with_previous(a_left, b_left, pa_left, pb_left, a_right, b_right, pa_right, pb_right):
    # As _linear_combine, carrying a second map: the composition of every step before the last one.
    # Scanning elements (a_t, b_t, 1, 0) gives at t both the map up to and including step t and the
    # map up to step t-1, i.e. the state after and before step t, from one scan.
    return (a_left * a_right, a_right * b_left + b_right,
            a_left * pa_right, pa_right * b_left + pb_right)


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without losing digits for very negative x (small dt), as mamba-ssm's log1pf:
    # log1p(e) = log(1 + e) * e / ((1 + e) - 1) corrects the rounding of 1 + e.
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    log1p_e = tl.where(one_plus == 1.0, e, tl.log(one_plus) * e / (one_plus - 1.0))
    return tl.maximum(x, 0.0) + log1p_e


@triton.jit
def _load_dt(delta_ptr, bias, offs_t, offs_d, mask, s_l, s_d, SOFTPLUS: tl.constexpr):
    """dt for a (BLOCK_T, BLOCK_D) tile, and the pre-softplus value; dt = 0 where ``mask`` is off."""
    raw = tl.load(delta_ptr + offs_t[:, None] * s_l + offs_d[None, :] * s_d, mask=mask, other=0.0)
    raw = raw.to(tl.float32) + bias[None, :]
    dt = _softplus(raw) if SOFTPLUS else raw
    # dt = 0 makes a step the identity (decay 1, input 0): padding steps then change nothing.
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _chunk_inputs(u_ptr, delta_ptr, B_ptr, bias, A2, offs_t, offs_d, offs_n, mask_td, mask_tn,
                  s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, SOFTPLUS: tl.constexpr):
    """(decay, input) of the steps in ``offs_t``: exp(dt A) and dt u B, both (BLOCK_T, BLOCK_D, BLOCK_N)."""
    dt, raw = _load_dt(delta_ptr, bias, offs_t, offs_d, mask_td, s_dl, s_dd, SOFTPLUS)
    u = tl.load(u_ptr + offs_t[:, None] * s_ul + offs_d[None, :] * s_ud, mask=mask_td, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + offs_t[:, None] * s_bl + offs_n[None, :] * s_bn, mask=mask_tn, other=0.0).to(tl.float32)
    decay = tl.exp2(dt[:, :, None] * A2[None, :, :])
    inp = (dt * u)[:, :, None] * Bt[:, None, :]
    return decay, inp, dt, raw, u, Bt


@triton.jit
def _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, mask_d, mask_n, N, HAS_BIAS: tl.constexpr,
                    HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_D, BLOCK_N), A * log2(e), delta_bias and D of the program's channels, float32.

    exp(dt A) = exp2(dt A2); padded states get A = 0 (decay 1, input 0); absent bias and D are zeros.
    """
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :],
                other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros(
        [BLOCK_D], tl.float32)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    return A, A * 1.4426950408889634, bias, Dv


@triton.jit
def _pick(x, offs_local, index: tl.constexpr):
    """x[index] of a (BLOCK_T, BLOCK_D, BLOCK_N) tile (register tiles cannot be indexed)."""
    return tl.sum(tl.where(offs_local[:, None, None] == index, x, 0.0), axis=0)


# Tiles are (time, channel, state) with time first: Triton spreads threads over the last axes, so
# each thread holds a run of time steps and the scans along time stay within a thread.
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    L, DIM, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_LAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_local = tl.arange(0, BLOCK_T)
    mask_d, mask_n = offs_d < DIM, offs_n < N
    A, A2, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, mask_d, mask_n, N, HAS_BIAS, HAS_D,
                                      BLOCK_D)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    B_ptr += b * s_bb
    C_ptr += b * s_cb
    z_ptr += b * s_zb
    out_ptr += b * s_ob
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    t0 = 0
    while t0 < L:  # (a while loop: Triton's interpreter cannot range() over a runtime length with numpy 2)
        offs_t = t0 + offs_local
        mask_t = offs_t < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        decay, inp, dt, raw, u, Bt = _chunk_inputs(u_ptr, delta_ptr, B_ptr, bias, A2, offs_t, offs_d, offs_n,
                                                   mask_td, mask_tn, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, SOFTPLUS)
        decay_prod, local = tl.associative_scan((decay, inp), 0, _linear_combine)
        states = decay_prod * h[None, :, :] + local
        Ct = tl.load(C_ptr + offs_t[:, None] * s_cl + offs_n[None, :] * s_cn, mask=mask_tn, other=0.0).to(tl.float32)
        y = tl.sum(states * Ct[:, None, :], axis=2)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + offs_t[:, None] * s_zl + offs_d[None, :] * s_zd, mask=mask_td, other=0.0)
            z = z.to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + offs_t[:, None] * s_ol + offs_d[None, :] * s_od, y.to(out_ptr.dtype.element_ty),
                 mask=mask_td)
        # Padding steps are the identity, so the chunk's last slot holds the state after its last real step.
        h = _pick(states, offs_local, BLOCK_T - 1)
        t0 += BLOCK_T
    if STORE_LAST:
        tl.store(last_ptr + b * DIM * N + offs_d[:, None] * N + offs_n[None, :], h,
                 mask=mask_d[:, None] & mask_n[None, :])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, chunk_h0_ptr,
    L, DIM, N, N_CHUNKS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl, s_zb, s_zd, s_zl,
    s_gb, s_gd, s_gl, s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Gradients, with g_t = dLoss/dh_t, a_t = exp(dt_t A), dy_t the gradient of y_t before D and the gate:
    #   g_t = dy_t C_t + a_{t+1} g_{t+1}
    #   dC_t = sum_d dy_t h_t    dB_t = sum_d g_t dt_t u_t    dx_t = sum_n g_t B_t
    #   q_t = g_t a_t h_{t-1}    d dt_t = sum_n q_t A + dx_t u_t    dA = sum_{b,t} q_t dt_t
    #   du_t = dx_t dt_t + dy_t D
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_local = tl.arange(0, BLOCK_T)
    mask_d, mask_n = offs_d < DIM, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A, A2, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, mask_d, mask_n, N, HAS_BIAS, HAS_D,
                                      BLOCK_D)
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
    # This program's chunk-start states: (N_CHUNKS, BLOCK_D, BLOCK_N), float32.
    chunk_h0_ptr += (b * tl.num_programs(1) + pid_d) * N_CHUNKS * BLOCK_D * BLOCK_N
    tile_dn = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

    # Pass 1: re-run the forward, keeping only the state before each chunk.
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    c = 0
    while c < N_CHUNKS:
        offs_t = c * BLOCK_T + offs_local
        mask_t = offs_t < L
        tl.store(chunk_h0_ptr + c * BLOCK_D * BLOCK_N + tile_dn, h)
        decay, inp, dt, raw, u, Bt = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, bias, A2, offs_t, offs_d, offs_n, mask_t[:, None] & mask_d[None, :],
            mask_t[:, None] & mask_n[None, :], s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, SOFTPLUS)
        decay_prod, local = tl.associative_scan((decay, inp), 0, _linear_combine)
        h = _pick(decay_prod * h[None, :, :] + local, offs_local, BLOCK_T - 1)
        c += 1
    # Pass 2 may read a chunk state that another thread of this program wrote.
    tl.debug_barrier()

    # Pass 2: the chunks in reverse.
    k_next = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    c = N_CHUNKS - 1
    while c >= 0:
        offs_t = c * BLOCK_T + offs_local
        mask_t = offs_t < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        h0 = tl.load(chunk_h0_ptr + c * BLOCK_D * BLOCK_N + tile_dn)
        decay, inp, dt, raw, u, Bt = _chunk_inputs(u_ptr, delta_ptr, B_ptr, bias, A2, offs_t, offs_d, offs_n,
                                                   mask_td, mask_tn, s_ul, s_ud, s_dl, s_dd, s_bl, s_bn, SOFTPLUS)
        # h_t and h_{t-1} for every step of the chunk from one scan.  (Recovering h_{t-1} as
        # (h_t - input_t) / decay_t would divide by decays that underflow to zero.)
        ones, zeros = tl.full(decay.shape, 1.0, tl.float32), tl.zeros(decay.shape, tl.float32)
        prod, local, prod_p, local_p = tl.associative_scan((decay, inp, ones, zeros), 0,
                                                           _linear_combine_with_previous)
        states = prod * h0[None, :, :] + local
        h_prev = prod_p * h0[None, :, :] + local_p

        Ct = tl.load(C_ptr + offs_t[:, None] * s_cl + offs_n[None, :] * s_cn, mask=mask_tn, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + offs_t[:, None] * s_gl + offs_d[None, :] * s_gd, mask=mask_td, other=0.0)
        dy = dy.to(tl.float32)
        if HAS_Z:
            y = tl.sum(states * Ct[:, None, :], axis=2)
            if HAS_D:
                y += Dv[None, :] * u
            z = tl.load(z_ptr + offs_t[:, None] * s_zl + offs_d[None, :] * s_zd, mask=mask_td, other=0.0)
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))  # silu'(z) = sig (1 + z (1 - sig))
            tl.store(dz_ptr + offs_t[:, None] * s_dzl + offs_d[None, :] * s_dzd, dz.to(dz_ptr.dtype.element_ty),
                     mask=mask_td)
            dy = dy * z * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=0)

        # Backwards through the chunk with k_t = a_t g_t, which needs only this chunk's decays:
        # k_t = a_t k_{t+1} + a_t dy_t C_t and g_t = dy_t C_t + k_{t+1}, the latter from the same
        # reverse scan as the map of the steps after t.  k_next = k at the following chunk's first step.
        dyC = dy[:, :, None] * Ct[:, None, :]
        prod_k, local_k, prod_kn, local_kn = tl.associative_scan((decay, decay * dyC, ones, zeros), 0,
                                                                 _linear_combine_with_previous, reverse=True)
        g = dyC + prod_kn * k_next[None, :, :] + local_kn
        k = prod_k * k_next[None, :, :] + local_k
        k_next = _pick(k, offs_local, 0)

        dC = tl.sum(dy[:, :, None] * states, axis=1)
        tl.atomic_add(dC_ptr + offs_t[:, None] * N + offs_n[None, :], dC, mask=mask_tn)
        x = dt * u
        dB = tl.sum(g * x[:, :, None], axis=1)
        tl.atomic_add(dB_ptr + offs_t[:, None] * N + offs_n[None, :], dB, mask=mask_tn)
        dx = tl.sum(g * Bt[:, None, :], axis=2)
        q = k * h_prev  # = g_t a_t h_{t-1}
        d_dt = tl.sum(q * A[None, :, :], axis=2) + dx * u
        dA_acc += tl.sum(q * dt[:, :, None], axis=0)
        du = dx * dt
        if HAS_D:
            du += dy * Dv[None, :]
        if SOFTPLUS:
            d_dt = d_dt * tl.sigmoid(raw)  # softplus' = sigmoid
        tl.store(du_ptr + offs_t[:, None] * s_dul + offs_d[None, :] * s_dud, du.to(du_ptr.dtype.element_ty),
                 mask=mask_td)
        tl.store(ddelta_ptr + offs_t[:, None] * s_ddl + offs_d[None, :] * s_ddd, d_dt.to(ddelta_ptr.dtype.element_ty),
                 mask=mask_td)
        c -= 1
    # Per-batch-row partial sums of dA and dD (summed over the batch outside: deterministic, and small).
    tl.store(dA_ptr + b * DIM * N + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + b * DIM + offs_d, dD_acc, mask=mask_d)


def launch_config(d, n, L):
    """(BLOCK_D, BLOCK_T, num_warps) for a shape, from the tiling sweep of benchmarks/scan.py on an H100.

    A tile of BLOCK_D x n x BLOCK_T near 2048 values on two warps was fastest for d_state 32: chunks of
    4 steps up to L = 2048, of 8 steps beyond (fewer chunk-start states for the backward to keep).
    """
    block_n = triton.next_power_of_2(n)
    block_t = min(4 if L <= 2048 else 8, triton.next_power_of_2(L))
    block_d = max(1, min(triton.next_power_of_2(d), 2048 // (block_n * block_t)))
    return block_d, block_t, 2


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, config):
        batch, d, L = u.shape
        n = A.shape[1]
        block_d, block_t, warps = config or launch_config(d, n, L)
        out = torch.empty((batch, d, L), device=u.device, dtype=u.dtype)
        last = torch.empty((batch, d, n), device=u.device, dtype=torch.float32) if return_last_state else out
        dummy = u  # stands in for absent optional tensors (never read: the flags are off)
        grid = (batch, triton.cdiv(d, block_d))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, last,
            L, d, n,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *(z if z is not None else u).stride(),
            *out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), STORE_LAST=bool(return_last_state),
            BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n), BLOCK_T=block_t, num_warps=warps,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.launch = (block_d, block_t, warps)
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *_dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        batch, d, L = u.shape
        n = A.shape[1]
        block_d, block_t, warps = ctx.launch
        block_n = triton.next_power_of_2(n)
        n_chunks = triton.cdiv(L, block_t)
        d_blocks = triton.cdiv(d, block_d)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        # (batch, L, n), returned as (batch, n, L) views: the kernel adds a time step's n values at once.
        dB = torch.zeros((batch, L, n), device=u.device, dtype=torch.float32)
        dC = torch.zeros((batch, L, n), device=u.device, dtype=torch.float32)
        dA = torch.empty((batch, d, n), device=u.device, dtype=torch.float32)
        dD = torch.empty((batch, d), device=u.device, dtype=torch.float32) if D is not None else None
        chunk_h0 = torch.empty((batch * d_blocks * n_chunks * block_d * block_n,), device=u.device,
                               dtype=torch.float32)
        dummy = u
        _scan_bwd_kernel[(batch, d_blocks)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, dout,
            du, ddelta, dz if dz is not None else dummy, dB, dC, dA, dD if dD is not None else dummy, chunk_h0,
            L, d, n, n_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *(z if z is not None else u).stride(),
            *dout.stride(), *du.stride(), *ddelta.stride(), *(dz if dz is not None else u).stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t, num_warps=warps,
        )
        ddelta_bias = ddelta.float().sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        dD = dD.sum(0).to(D.dtype) if D is not None else None
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.transpose(1, 2).to(B.dtype), dC.transpose(1, 2).to(C.dtype), dD, dz, ddelta_bias,
                None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, config=None):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` arguments, as Triton kernels.

    Inputs may be float32, float16 or bfloat16 and non-contiguous along any axis (strides are
    passed to the kernels); the arithmetic is float32 and the output has u's dtype. A must be real
    (d, n) and B, C (batch, n, L). ``config`` = (BLOCK_D, BLOCK_T, num_warps) overrides
    :func:`launch_config` (for benchmarks). With ``return_last_state`` returns
    ``(out, last_state)``, last_state (batch, d, n) float32, not differentiated.
    """
    if A.is_complex() or B.dim() != 3 or C.dim() != 3:
        raise NotImplementedError("selective_scan_triton: needs real A and B, C of shape (batch, n, L)")
    return _TritonSelectiveScan.apply(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                                      None if delta_bias is None else delta_bias.float(),
                                      delta_softplus, return_last_state, config)
