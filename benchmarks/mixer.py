"""The plugin's Mamba block (cuda backend) against mamba-ssm's own ``Mamba`` module, same weights.

Both call mamba-ssm's fused ``mamba_inner_fn``; this shows what the code around it costs.
Forward + backward at (batch, length) = (2048, 200), d_model 64, d_state 32, d_conv 4, expand 2,
in float32 and under bfloat16 autocast: median ms over timed steps after warm-up (synchronised),
and a torch.profiler table of the GPU kernels for each. Needs a GPU with mamba-ssm and causal-conv1d.
Writes benchmarks/results/mixer.{json,md} and mixer_profile.txt.

    python benchmarks/mixer.py
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole_mamba.nn.mamba_mixer import MambaMixer  # noqa: E402


def twin_blocks(d_model=64, d_state=32):
    from mamba_ssm import Mamba

    torch.manual_seed(0)
    ours = MambaMixer(d_model, d_state=d_state, d_conv=4, expand=2, backend="cuda").cuda()
    theirs = Mamba(d_model, d_state=d_state, d_conv=4, expand=2).cuda()
    theirs.load_state_dict(ours.state_dict())
    return {"recbole_mamba MambaMixer": ours, "mamba_ssm Mamba": theirs}


def make_step(block, x, grad, dtype):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = block(x)
        y.backward(grad.to(y.dtype))
        return y

    return step


def time_step(step, steps, warmup=5):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def kernel_table(step, steps=5):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    env = _report.environment()
    blocks = twin_blocks()
    x = torch.randn(args.batch, args.length, 64, device="cuda", requires_grad=True)
    grad = torch.randn(args.batch, args.length, 64, device="cuda")
    with torch.no_grad():
        outputs = [block(x) for block in blocks.values()]
    max_difference = (outputs[0] - outputs[1]).abs().max().item()

    rows, profiles = [], []
    for dtype in ("fp32", "bf16"):
        for name, block in blocks.items():
            step = make_step(block, x, grad, dtype)
            ms = time_step(step, args.steps)
            rows.append({"block": name, "dtype": dtype, "batch": args.batch, "length": args.length, "ms": ms})
            profiles.append(f"## {name}, {dtype}, 5 steps\n\n{kernel_table(step)}")
            print(rows[-1], flush=True)
    table = ["| dtype | block | ms (forward + backward) |", "|---|---|---|"]
    table += [f"| {r['dtype']} | {r['block']} | {r['ms']:.2f} |" for r in rows]
    notes = (f"Batch {args.batch}, length {args.length}; same weights in both blocks "
             f"(largest output difference in float32: {max_difference:.2e}).")
    _report.write("mixer", env, {"rows": rows, "max_output_difference": max_difference}, "\n".join(table), notes)
    (_report.RESULTS / "mixer_profile.txt").write_text("\n\n".join(profiles) + "\n")


if __name__ == "__main__":
    main()
