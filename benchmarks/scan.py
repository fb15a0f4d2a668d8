"""The Triton selective scan against mamba-ssm's CUDA kernel: forward + backward, one GPU.

Shapes: (batch, L) in (2048, 200), (256, 512), (64, 2048), (16, 8192), each with d_inner 128 and
256 and d_state 16 and 32 (float32, delta_softplus, D, z and delta_bias: what a Mamba block passes).
Per shape: median ms of forward + backward over timed repetitions after warm-up (CUDA events), the
ratio Triton / mamba-ssm, and what the Triton kernels achieve against this GPU's ceilings, measured
first in the same run: the bandwidth of a large device-to-device copy and the exp2 throughput of a
register-only Triton kernel. ``--sweep`` also times every tiling in SWEEP and reports the best per
shape (to choose ``launch_config``). Writes benchmarks/results/scan.{json,md}.

    python benchmarks/scan.py [--sweep] [--reps 20]
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole_mamba.nn import triton_scan  # noqa: E402
from recbole_mamba.nn.mamba_mixer import median_cuda_ms  # noqa: E402

SHAPES = [(2048, 200), (256, 512), (64, 2048), (16, 8192)]
WIDTHS = [128, 256]
STATES = [16, 32]
# (BLOCK_D, BLOCK_T, num_warps[, time segments[, forward BLOCK_D, forward num_warps]]) tried by --sweep.
SWEEP = [(8, 4, 1), (4, 4, 1), (8, 2, 1), (4, 8, 1), (8, 8, 1), (16, 4, 2), (16, 2, 2), (32, 4, 4),
         *((block_d, 4, 1, segments) for block_d in (4, 8) for segments in (2, 4, 8, 16, 32)),
         *((8, 4, 1, 1, block_d, warps) for block_d, warps in ((8, 1), (16, 1), (32, 2), (32, 4)))]


def make_inputs(batch, d, n, L, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)

    return dict(u=rnd(batch, d, L), delta=rnd(batch, d, L) * 0.5,
                A=-torch.exp(torch.log(torch.arange(1, n + 1, device="cuda", dtype=torch.float32)).repeat(d, 1)),
                B=rnd(batch, n, L), C=rnd(batch, n, L), D=torch.ones(d, device="cuda"), z=rnd(batch, d, L),
                delta_bias=torch.rand(d, device="cuda") - 4.0)


def time_major(inputs):
    """The same values as views of (batch, L, features) tensors: the layout the Mamba block produces."""
    return {k: v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v for k, v in inputs.items()}


def fwd_bwd(scan, inputs, **kwargs):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    grad = torch.randn_like(inputs["u"])

    def step():
        y = scan(**leaves, delta_softplus=True, **kwargs)
        y.backward(grad)

    return step


@triton.jit
def _exp2_loop(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.5)  # stays in (0, 1]: no overflow, and each exp2 depends on the last
        acc += x
    tl.store(out_ptr + offs, acc)


def ceilings():
    """This GPU's copy bandwidth (GB/s, read + write) and exp2 throughput (per second)."""
    src = torch.empty(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_cuda_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    bandwidth = 2 * src.numel() * 4 / (copy_ms / 1000) / 1e9
    block, iters = 1024, 4096
    x = torch.rand(132 * 64 * block, device="cuda")
    out = torch.empty_like(x)
    exp_ms = median_cuda_ms(lambda: _exp2_loop[(x.numel() // block,)](x, out, ITERS=iters, BLOCK=block), warmup=3, reps=5)
    exps_per_s = x.numel() * iters / (exp_ms / 1000)
    return {"copy_GBps": round(bandwidth, 1), "exp2_per_s": exps_per_s}


def traffic_bytes(batch, d, n, L):
    """Least memory traffic of forward + backward: each (batch, d, L) / (batch, n, L) tensor read or written once."""
    big, small = batch * d * L * 4, batch * n * L * 4
    forward = 3 * big + 2 * small + big  # u, delta, z, B, C in; out
    backward = 4 * big + 2 * small + 3 * big + 2 * small  # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out
    return forward + backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time every tiling in SWEEP too")
    parser.add_argument("--name", default="scan")
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS, help="d_inner values")
    parser.add_argument("--states", type=int, nargs="+", default=STATES, help="d_state values")
    args = parser.parse_args()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    env = _report.environment()
    env["triton"] = triton.__version__
    ceiling = ceilings()
    print(f"ceilings: copy {ceiling['copy_GBps']} GB/s, exp2 {ceiling['exp2_per_s']:.3g}/s", flush=True)
    rows = []
    for batch, L in SHAPES:
        for d in args.widths:
            for n in args.states:
                x = make_inputs(batch, d, n, L)
                mamba_ms = median_cuda_ms(fwd_bwd(selective_scan_fn, x), warmup=3, reps=args.reps)
                default = triton_scan.launch_config(d, n, L, batch)
                tried = {default: median_cuda_ms(fwd_bwd(triton_scan.selective_scan_triton, x, config=default), warmup=3,
                                                reps=args.reps)}
                if args.sweep and (d, n) == (128, 32):  # the recommendation shape; compiles cost time
                    for config in SWEEP:
                        if config not in tried:
                            try:
                                tried[config] = median_cuda_ms(
                                    fwd_bwd(triton_scan.selective_scan_triton, x, config=config),
                                    warmup=3, reps=max(5, args.reps // 4))
                            except Exception as e:  # a tiling that does not compile or fit: record and go on
                                print(f"  {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                ours_tm = median_cuda_ms(fwd_bwd(triton_scan.selective_scan_triton, time_major(x), config=default),
                                         warmup=3, reps=args.reps)
                fwd_only = median_cuda_ms(lambda: triton_scan.selective_scan_triton(**x, delta_softplus=True, config=default),
                                          warmup=3, reps=args.reps)
                best = min(tried, key=tried.get)
                ours = tried[default]
                # Exps the Triton kernels compute: 1 per (b, d, t, n) forward, 2 backward.
                exps = 3 * batch * d * L * n
                row = {
                    "batch": batch, "L": L, "d_inner": d, "d_state": n,
                    "mamba_ssm_ms": round(mamba_ms, 3), "triton_ms": round(ours, 3),
                    "ratio": round(ours / mamba_ms, 3), "triton_config": list(default),
                    "triton_time_major_ms": round(ours_tm, 3), "triton_forward_ms": round(fwd_only, 3),
                    "best_config": list(best), "best_ms": round(tried[best], 3),
                    "triton_GBps": round(traffic_bytes(batch, d, n, L) / (ours / 1000) / 1e9, 1),
                    "triton_exp2_fraction": round(exps / (ours / 1000) / ceiling["exp2_per_s"], 3),
                    "sweep": {str(k): round(v, 3) for k, v in tried.items()} if args.sweep else None,
                }
                rows.append(row)
                print(row, flush=True)
                del x
                torch.cuda.empty_cache()
    lines = ["| batch | L | d_inner | d_state | mamba-ssm ms | Triton ms | ratio | Triton GB/s | exp2 share | tiling |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['L']} | {r['d_inner']} | {r['d_state']} | {r['mamba_ssm_ms']} | "
                     f"{r['triton_ms']} | {r['ratio']} | {r['triton_GBps']} | {r['triton_exp2_fraction']} | "
                     f"{tuple(r['triton_config'])} |")
    notes = (f"Forward + backward, float32, median of {args.reps} CUDA-event-timed repetitions after 3 warm-up ones. "
             f"Ceilings measured in this run: copy {ceiling['copy_GBps']} GB/s (read + write), exp2 "
             f"{ceiling['exp2_per_s']:.3g}/s. 'Triton GB/s' counts the least traffic (every input read and every "
             "output written once); 'exp2 share' is the Triton kernels' exp2 count (3 per state update: 1 forward, "
             "2 backward) over the time, as a share of the exp2 ceiling. Tiling = (BLOCK_D, BLOCK_T, num_warps, "
             "time segments, forward BLOCK_D, forward num_warps) (launch_config).")
    env["ceilings"] = ceiling
    print("\n".join(lines))
    for path in _report.write(args.name, env, rows, "\n".join(lines), notes):
        print("wrote", path)


if __name__ == "__main__":
    main()
