"""Mamba's selective scan in plain PyTorch (the CPU / "torch" backend).

Both functions take the arguments of mamba-ssm 2.3.2's
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (real ``A`` only)::

    u, delta: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)
    D, delta_bias: (d,) or None    z: (batch, d, L) or None

and compute, with ``dt = softplus(delta + delta_bias)`` (bias and softplus optional)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (h_{-1} = 0, h_t: (batch, d, n))
    y_t = sum_n h_t * C_t  (+ D * u_t)                      then  y = y * silu(z)

* ``selective_scan`` is the fast path: a custom autograd Function that walks the sequence
  in chunks of a few steps.  Whatever can be done for a whole chunk at once (the decays,
  the inputs, the C contraction, all gradient contractions) is one large tensor op; only
  the true recurrence ``h_t = a_t * h_{t-1} + x_t`` stays in a Python loop, as one
  in-place ``addcmul`` per step.  Forward keeps only each chunk's starting state and
  backward recomputes the chunk's states, so memory is O(batch*d*n*(L/chunk + chunk)).
* ``selective_scan_reference`` is the slow, obviously correct twin used by the tests.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["selective_scan", "selective_scan_reference"]

# Tuning, chosen by timing a few settings on 2-core machines (benchmarks/cpu_scan.py times the
# result).  The work is memory-bound, so what matters is that the per-step state
# (batch_block, d, n) and the per-chunk buffers (chunk, batch_block, d, n) stay in cache:
# about 512 KiB and 4 MiB.
_SLAB_BYTES = 512 * 1024
_CHUNK_BYTES = 4 * 1024 * 1024
_MAX_CHUNK = 64

_LOG2_E = 1.4426950408889634  # exp(v) = exp2(v * log2(e)); exp2 is ~2x faster than exp on CPU


def _time_major(x):
    """(batch, k, L) -> contiguous (L, batch, k): one time step becomes one contiguous slab."""
    return x.permute(2, 0, 1).contiguous()


def _chunk_dt(delta, delta_bias, delta_softplus, t0, t1):
    """(delta + delta_bias, dt) for steps t0:t1 of time-major delta, dt = softplus(delta + delta_bias)."""
    raw = delta[t0:t1] if delta_bias is None else delta[t0:t1] + delta_bias
    return raw, (F.softplus(raw) if delta_softplus else raw)


def _chunk_states(h0, dt, x, A_log2e, B, decay_buf, state_buf):
    """Run the recurrence over one chunk of T steps.

    h0: (b, d, n) state before the chunk; dt and x = dt * u: (T, b, d); B: (T, b, n).
    Returns ``decay`` (T, b, d, n), decay[t] = exp(dt_t * A), and ``states`` (T + 1, b, d, n),
    states[0] = h0 and states[t + 1] = h_t: views of the preallocated buffers, which are
    reused from chunk to chunk (a fresh large allocation per chunk would be slow).
    """
    T = dt.shape[0]
    decay = torch.mul(dt.unsqueeze(-1), A_log2e, out=decay_buf[:T])
    torch.exp2(decay, out=decay)
    states = state_buf[: T + 1]
    states[0].copy_(h0)
    # The input term dt_t * u_t * B_t of every step at once, written where h_t will live ...
    torch.mul(x.unsqueeze(-1), B.unsqueeze(-2), out=states[1:])
    # ... so that the sequential part is one fused in-place multiply-add per step.
    for t in range(T):
        states[t + 1].addcmul_(decay[t], states[t])
    return decay, states


class _SelectiveScanFn(torch.autograd.Function):
    """The whole selective scan on float32 inputs, chunk by chunk, with a hand-written backward.

    The inputs are copied once to time-major layout.  Softplus, D and the z gate are applied
    per chunk on small tensors rather than as separate autograd ops on (batch, d, L) tensors,
    each of which would cost a fresh large allocation.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        b, d, L = u.shape
        n = A.shape[1]
        T = min(chunk_size, L)
        u, delta, B, C = _time_major(u), _time_major(delta), _time_major(B), _time_major(C)
        z = _time_major(z) if z is not None else None
        A_log2e = A * _LOG2_E
        out = torch.empty_like(u)
        y_ungated = torch.empty_like(u) if z is not None else None  # backward needs it for dz
        # Each chunk's starting state: all that backward needs to rebuild the states.
        chunk_h0 = u.new_empty((L + T - 1) // T, b, d, n)
        chunk_h0[0].zero_()
        decay_buf = u.new_empty(T, b, d, n)
        state_buf = u.new_empty(T + 1, b, d, n)
        for k in range(chunk_h0.shape[0]):
            t0, t1 = k * T, min(k * T + T, L)
            _, dt = _chunk_dt(delta, delta_bias, delta_softplus, t0, t1)
            decay, states = _chunk_states(chunk_h0[k], dt, dt * u[t0:t1], A_log2e, B[t0:t1],
                                          decay_buf, state_buf)
            if k + 1 < chunk_h0.shape[0]:
                chunk_h0[k + 1].copy_(states[-1])
            # y_t = sum_n h_t C_t for the whole chunk (the decay buffer is free to hold the
            # product; mul + sum is faster than batched matrix-vector products here).
            y = torch.sum(torch.mul(states[1:], C[t0:t1].unsqueeze(-2), out=decay), dim=-1, out=out[t0:t1])
            if D is not None:
                y.addcmul_(u[t0:t1], D)
            if z is not None:
                y_ungated[t0:t1] = y
                y *= F.silu(z[t0:t1])
        last_state = states[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y_ungated, chunk_h0)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = T
        ctx.mark_non_differentiable(last_state)
        return out.permute(1, 2, 0), last_state  # a (batch, d, L) view, no copy

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast_state):
        # Matmuls must not drop to bf16 even if backward is called inside autocast.
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return _scan_backward(ctx, dout)


def _scan_backward(ctx, dout):
    # Reverse-time adjoint.  With a_t = exp(dt_t A), x_t = dt_t u_t and dy_t the gradient
    # of y_t before D and the gate, the gradient of the loss w.r.t. h_t is
    #   g_t = dy_t * C_t + a_{t+1} * g_{t+1}
    # and then, step by step:
    #   dC_t = sum_d dy_t h_t      dB_t = sum_d g_t x_t      dx_t = sum_n g_t B_t
    #   q_t = g_t * a_t * h_{t-1}  (the gradient w.r.t. the exponent dt_t A)
    #   d dt_t = sum_n q_t A + dx_t u_t      dA = sum_{b,t} q_t dt_t      du_t = dx_t dt_t
    # All tensors here are time-major: (L, b, d) or (L, b, n).
    u, delta, A, B, C, D, z, delta_bias, y_ungated, chunk_h0 = ctx.saved_tensors
    T = ctx.chunk_size
    L, b, d = u.shape
    n = A.shape[1]
    A_log2e = A * _LOG2_E
    dout = _time_major(dout)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.zeros_like(A)
    dD = torch.zeros_like(D) if D is not None else None
    decay_buf = u.new_empty(T, b, d, n)
    state_buf = u.new_empty(T + 1, b, d, n)
    g_buf = u.new_empty(T, b, d, n)
    work_buf = u.new_empty(T, b, d, n)
    g_carry = u.new_zeros(b, d, n)  # a_{t1} * g_{t1}: what the following chunk passes back
    for k in reversed(range(chunk_h0.shape[0])):
        t0, t1 = k * T, min(k * T + T, L)
        m = (t1 - t0) * b
        raw, dt = _chunk_dt(delta, delta_bias, ctx.delta_softplus, t0, t1)
        x = dt * u[t0:t1]
        decay, states = _chunk_states(chunk_h0[k], dt, x, A_log2e, B[t0:t1], decay_buf, state_buf)

        # Back through the gate (out = y * silu(z)) and the skip connection (y += D * u).
        dy = dout[t0:t1]
        if z is not None:
            sig = torch.sigmoid(z[t0:t1])
            # silu'(z) = sig * (1 + z * (1 - sig))
            torch.mul(dy * y_ungated[t0:t1], sig * (1 + z[t0:t1] * (1 - sig)), out=dz[t0:t1])
            dy = dy * z[t0:t1] * sig  # not in place: dy may be a view of dout
        if D is not None:
            dD += (dy * u[t0:t1]).sum((0, 1))

        # The adjoint recurrence, backwards through the chunk.
        g = torch.mul(dy.unsqueeze(-1), C[t0:t1].unsqueeze(-2), out=g_buf[: t1 - t0])
        g[-1] += g_carry
        for t in range(t1 - t0 - 2, -1, -1):
            g[t].addcmul_(decay[t + 1], g[t + 1])
        torch.mul(decay[0], g[0], out=g_carry)
        work = work_buf[: t1 - t0]

        # Contractions over d: batched (1 x d) @ (d x n) products over (time, batch).
        torch.bmm(dy.reshape(m, 1, d), states[1:].view(m, d, n), out=dC[t0:t1].view(m, 1, n))
        torch.bmm(x.view(m, 1, d), g.view(m, d, n), out=dB[t0:t1].view(m, 1, n))
        # Contractions over n: mul + sum (faster than matrix-vector products here).
        dx = torch.sum(torch.mul(g, B[t0:t1].unsqueeze(-2), out=work), dim=-1)
        q = decay.mul_(states[:-1]).mul_(g)  # in place: the decays are not needed any more
        d_dt = torch.sum(torch.mul(q, A, out=work), dim=-1, out=ddelta[t0:t1])
        dA += torch.mul(q, dt.unsqueeze(-1), out=work).view(m, d, n).sum(0)

        d_dt.addcmul_(dx, u[t0:t1])
        du_c = torch.mul(dx, dt, out=du[t0:t1])
        if D is not None:
            du_c.addcmul_(dy, D)
        if ctx.delta_softplus:
            d_dt *= torch.sigmoid(raw)  # softplus' = sigmoid
    ddelta_bias = ddelta.sum((0, 1)) if delta_bias is not None else None

    def batch_major(x):  # (L, b, k) -> a (b, k, L) view, no copy
        return None if x is None else x.permute(1, 2, 0)

    return (batch_major(du), batch_major(ddelta), dA, batch_major(dB), batch_major(dC), dD,
            batch_major(dz), ddelta_bias, None, None)


def _check_decay_exponent(A, delta, delta_bias, delta_softplus):
    """Refuse inputs for which exp(dt * A) could overflow.

    The decay exp(dt * A) stays in [0, 1] for every dt >= 0 when A <= 0: with dt from 1e-4 to 1e2
    and A = -1 .. -d_state it only underflows to exact zeros, which the recurrence and its gradient
    handle. A > 0 (or inf / nan) or, without softplus, dt < 0 makes the exponent positive, the decay
    overflows to inf and every later state to inf or nan, so such inputs are an error here. The Mamba
    mixer never passes them: its A = -exp(A_log) and its dt = softplus(...).
    """
    with torch.no_grad():
        unstable_A = bool(((A > 0) | ~torch.isfinite(A)).any())
        negative_dt = not delta_softplus and bool(
            ((delta if delta_bias is None else delta + delta_bias[:, None]) < 0).any()
        )
    if unstable_A:
        raise ValueError("selective_scan: A must be finite and <= 0 (A = -exp(A_log) in Mamba); "
                         "otherwise exp(dt * A) overflows")
    if negative_dt:
        raise ValueError("selective_scan: without delta_softplus, delta (+ delta_bias) must be >= 0; "
                         "otherwise exp(dt * A) overflows")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, chunk_size=None, batch_block=None):
    """Fast selective scan with the semantics and arguments of mamba-ssm's ``selective_scan_fn``.

    Differentiable in u, delta, A, B, C, D, z and delta_bias; plain torch ops, so it runs on
    any device.  The recurrence always runs in float32 (autocast is switched off inside) and
    the output has u's dtype; it may be a non-contiguous (batch, d, L) view.  With
    ``return_last_state`` it returns ``(y, last_state)``, last_state: (batch, d, n) float32,
    not differentiated (as in mamba-ssm).  ``chunk_size`` (steps per chunk) and
    ``batch_block`` (batch rows per block) only tune speed and memory; None picks them from
    the cache sizes above.  Inputs for which exp(dt * A) could overflow (A > 0, or dt < 0
    without softplus) raise ``ValueError``; see :func:`_check_decay_exponent`.
    """
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported")
    if B.dim() != 3 or C.dim() != 3:
        raise NotImplementedError("selective_scan: B and C must be (batch, d_state, L)")
    _check_decay_exponent(A, delta, delta_bias, delta_softplus)
    batch, d, _ = u.shape
    slab_row_bytes = 4 * d * A.shape[1]  # one batch row of the state, in float32
    if batch_block is None:
        batch_block = max(1, _SLAB_BYTES // slab_row_bytes)
    batch_block = min(batch_block, batch)
    if chunk_size is None:
        chunk_size = min(_MAX_CHUNK, max(1, _CHUNK_BYTES // (slab_row_bytes * batch_block)))
    out_dtype = u.dtype

    n_blocks = -(-batch // batch_block)

    def f32(t):
        return None if t is None else t.float()

    def blocks(t):
        # Blocks of the batch, so that each block's per-step state stays cache-sized.  Split
        # with torch.split rather than slicing, so that autograd joins the gradients once.
        return [None] * n_blocks if t is None else t.float().split(batch_block)

    with torch.autocast(device_type=u.device.type, enabled=False):
        A, D, delta_bias = f32(A), f32(D), f32(delta_bias)
        outs = [_SelectiveScanFn.apply(u_, delta_, A, B_, C_, D, z_, delta_bias,
                                       bool(delta_softplus), int(chunk_size))
                for u_, delta_, B_, C_, z_ in zip(blocks(u), blocks(delta), blocks(B), blocks(C), blocks(z))]
    if len(outs) == 1:
        y, last_state = outs[0]
    else:
        y, last_state = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    y = y.to(out_dtype)
    return (y, last_state) if return_last_state else y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, *, compute_dtype=torch.float64):
    """Slow, obviously correct selective scan: one Python step per time step, autograd for gradients.

    Computes in ``compute_dtype`` (float64 by default) and returns u's dtype.
    """
    out_dtype = u.dtype
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])  # the state before the first step: (batch, d, n)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]                           # (batch, d, 1)
        decay = torch.exp(dt * A)                           # (batch, d, n)
        inp = dt * B[:, None, :, t] * u[:, :, t, None]      # (batch, d, n)
        h = decay * h + inp
        ys.append((h * C[:, None, :, t]).sum(dim=-1))       # (batch, d)
    y = torch.stack(ys, dim=-1)                             # (batch, d, L)
    if D is not None:
        y = y + D.to(compute_dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    y = y.to(out_dtype)
    return (y, h) if return_last_state else y
