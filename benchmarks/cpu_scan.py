"""The pure-PyTorch selective scan on the CPU against the fastest simple alternative.

One Mamba block (d_model 64, d_state 32, d_conv 4, expand 2), batch 32, forward + backward, at
L = 200 and 2048, with two scans inside the same block:

- ``chunked``: recbole_mamba.nn.selective_scan.selective_scan (the ``torch`` backend);
- ``per-step loop``: a loop over ``unbind(1)`` time slices that discretises each step on the fly,
  differentiated by autograd (the fastest of the simple CPU implementations measured before this
  package existed: 0.18 s at L=200 and 2.7 s at L=2048 on the same kind of machine).

Reports the median of several timed repetitions after one warm-up (the two scans taking turns),
the ratio, and the memory each keeps for backward (what autograd saves, counted with saved-tensor
hooks), measured in one run. Writes benchmarks/results/cpu_scan.{json,md}.

    python benchmarks/cpu_scan.py            # about 3 minutes on 2 cores
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole_mamba.nn import mamba_mixer  # noqa: E402
from recbole_mamba.nn.selective_scan import selective_scan  # noqa: E402


def per_step_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same arguments and result as ``selective_scan``; one autograd step per time step."""
    u_t, delta_t, B_t, C_t = (x.transpose(1, 2) for x in (u, delta, B, C))  # (b, L, ...)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for u_s, delta_s, B_s, C_s in zip(u_t.unbind(1), delta_t.unbind(1), B_t.unbind(1), C_t.unbind(1)):
        dt = delta_s + delta_bias if delta_bias is not None else delta_s
        dt = F.softplus(dt) if delta_softplus else dt
        h = torch.exp(dt.unsqueeze(-1) * A) * h + (dt * u_s).unsqueeze(-1) * B_s.unsqueeze(1)
        ys.append((h * C_s.unsqueeze(1)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


SCANS = {"chunked": selective_scan, "per-step loop": per_step_loop_scan}


@contextlib.contextmanager
def scan_in_blocks(scan):
    """Inside the ``with``, torch-backend MambaMixers use ``scan`` instead of the chunked scan."""
    original, mamba_mixer.selective_scan = mamba_mixer.selective_scan, scan
    try:
        yield
    finally:
        mamba_mixer.selective_scan = original


def block_step(scan, batch, length):
    """(step, saved_mib): forward + backward through one Mamba block that uses ``scan``, and the
    MiB that its forward keeps for backward."""
    torch.manual_seed(0)
    block = mamba_mixer.MambaMixer(64, d_state=32, d_conv=4, expand=2, backend="torch")
    x = torch.randn(batch, length, 64, requires_grad=True)

    def step():
        with scan_in_blocks(scan):
            block(x).square().mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    def saved_mib():
        saved_bytes = []

        def count(tensor):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with scan_in_blocks(scan), torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            block(x)
        return sum(saved_bytes) / 2**20

    return step, saved_mib


def time_interleaved(steps, repeats):
    """Median seconds of each step function, run in turn (ABAB...) after one warm-up each, so that
    a slow spell of the machine hits all of them alike."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    env = _report.environment()
    print(f"{env['device']}, torch {env['versions']['torch']}, {env['torch_threads']} threads")
    rows = []
    for length in args.lengths:
        row = {"batch": args.batch, "length": length, "d_model": 64, "d_state": 32, "expand": 2}
        steps, saved = {}, {}
        for name, scan in SCANS.items():
            steps[name], saved[name] = block_step(scan, args.batch, length)
        repeats = args.repeats if length > 500 else 3 * args.repeats
        for name, seconds in time_interleaved(steps, repeats).items():
            row[f"{name} s"], row[f"{name} saved MiB"] = seconds, saved[name]()
        row["repeats"] = repeats
        row["speed-up"] = row["per-step loop s"] / row["chunked s"]
        rows.append(row)
        print(f"L={length:5d}  chunked {row['chunked s']:.3f} s, {row['chunked saved MiB']:.0f} MiB saved;"
              f"  per-step loop {row['per-step loop s']:.3f} s, {row['per-step loop saved MiB']:.0f} MiB saved;"
              f"  speed-up {row['speed-up']:.2f}x", flush=True)

    table = ["| batch | L | chunked scan (s) | per-step loop (s) | speed-up | saved for backward: chunked / loop (MiB) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['batch']} | {r['length']} | {r['chunked s']:.3f} | {r['per-step loop s']:.3f} | "
              f"{r['speed-up']:.2f}x | {r['chunked saved MiB']:.0f} / {r['per-step loop saved MiB']:.0f} |"
              for r in rows]
    notes = ("One Mamba block (d_model 64, d_state 32, expand 2), forward + backward; median of "
             f"{3 * args.repeats} runs (L <= 500) or {args.repeats} runs (longer) after a warm-up, the two "
             "scans taking turns, so both are timed in this one run under the same conditions.")
    for path in _report.write("cpu_scan", env, rows, "\n".join(table), notes):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
