"""Full-softmax cross entropy over every item, at every position: the implementations side by side.

The all-position CE loss scores N positions against all V items (hidden size d). Timed here,
forward + backward, float32, on one GPU:

- ``unchunked``: ``F.cross_entropy(hidden @ weight.T, targets)``, the (N x V) logits held whole;
- ``torch``: ``losses.chunked_cross_entropy(kernel="torch")``, the PyTorch chunks (the gradient is
  built while each chunk's logits are in memory);
- ``liger``: ``losses.chunked_cross_entropy(kernel="liger")``, Liger-Kernel's fused Triton kernel;
- ``triton``: ``losses.chunked_cross_entropy(kernel="triton")`` (the GPU default), no logits in
  memory, 3xTF32 products (the same whatever the GEMM setting);

the chunked ones at ``ce_chunk_size`` 4096 (the default) and 16384, each with float32 GEMMs and with TF32 GEMMs (``torch.backends.cuda.matmul.allow_tf32``). Reports
median ms (CUDA events, after warm-up) and peak memory above the inputs, and the largest
difference of each loss and gradient from the unchunked float32 one. Writes
benchmarks/results/ce_loss.{json,md}.

    python benchmarks/ce_loss.py [--reps 20]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole_mamba.nn import losses  # noqa: E402
from recbole_mamba.nn.mamba_mixer import median_cuda_ms  # noqa: E402

# (positions N, items V, hidden d): a lifelong batch (65,536 tokens, the generated data's 5,000
# items) and an ml-1m all-position batch (64 windows of 200, its 3,707 item ids).
SHAPES = [(65536, 5000, 64), (12800, 3707, 64)]
CHUNKS = (4096, 16384)


def implementations():
    impls = {"unchunked": lambda h, w, t: F.cross_entropy(h @ w.t(), t)}
    kernels = ["torch"]
    if losses.liger_cross_entropy_missing("cuda") is None:
        kernels.append("liger")
    else:
        print("liger_kernel is not installed: skipping it", flush=True)
    for kernel in kernels:
        for chunk in CHUNKS:
            impls[f"{kernel}, chunks of {chunk}"] = (
                lambda h, w, t, kernel=kernel, chunk=chunk: losses.chunked_cross_entropy(h, w, t, chunk, kernel))
    impls["triton (no chunks)"] = lambda h, w, t: losses.chunked_cross_entropy(h, w, t, 4096, "triton")
    return impls


def measure(impl, n, v, d, reps):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)

    def step():
        hidden.grad = weight.grad = None
        impl(hidden, weight, targets).backward()

    step()  # first call (Triton compilation); the .grad it leaves is part of the baseline memory
    loss = impl(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = median_cuda_ms(step, warmup=3, reps=reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak, loss.detach(), [gr.detach() for gr in grads]


def main():
    args, env = _report.gpu_benchmark_start(__doc__)
    rows = []
    for n, v, d in SHAPES:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            reference = None
            for name, impl in implementations().items():
                ms, peak, loss, grads = measure(impl, n, v, d, args.reps)
                if reference is None:  # the first, unchunked, is the reference
                    reference = loss, grads
                rows.append({
                    "N": n, "V": v, "d": d, "gemm": "tf32" if tf32 else "fp32", "impl": name, "ms": ms,
                    "peak_mib": peak, "loss_diff": float((loss - reference[0]).abs()),
                    "grad_diff": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, reference[1])),
                })
                print(rows[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = ["| N | V | d | GEMMs | implementation | ms (fwd + bwd) | peak MiB | loss diff | max grad diff (rel.) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['V']} | {r['d']} | {r['gemm']} | {r['impl']} | {r['ms']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['loss_diff']:.1e} | {r['grad_diff']:.1e} |")
    _report.write("ce_loss", env, {"rows": rows}, "\n".join(lines), notes=(
        f"Chunks: about that many positions' logits at once (Liger rounds its chunks to a power of two). Median of {args.reps} forward + backward "
        "passes (CUDA events) after 3 warm-up ones. Peak: torch.cuda.max_memory_allocated() above the inputs. "
        "Differences: against the unchunked loss with the same GEMM precision; gradients relative to the "
        "largest reference entry."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
