"""One lifelong training step on the GPU: step time and memory per variant, and where the peak comes from.

At MAX_ITEM_LIST_LENGTH 2,048 with 32 windows a batch (65,536 tokens, the lifelong benchmark's
batch), RecMamba with its defaults (CUDA graphs, the Triton scan) against variants, each in a fresh
process so that nothing one leaves behind counts in the next:

- ``default``: RecMamba's defaults, ``scan_kernel: triton``;
- ``recompute``: ``recompute_scan_inputs: true`` (recbole_mamba/nn/triton_mixer.py);
- ``scratch<MiB>`` (may follow ``recompute_``): the Triton scan backward's chunk-start scratch budget
  (``triton_scan.BACKWARD_SCRATCH_BYTES``) set to that many MiB;
- ``sasrec``: the SASRec encoder (RecBole) in RecMamba's place, as in benchmarks/lifelong.py.

Per variant: 6 untimed steps (the first captures the CUDA graphs), then 30 timed steps on batches
already on the GPU (CUDA events per step, median), peak memory over the timed steps
(``max_memory_reserved`` after emptying the cache: the graphs' pool included;
``max_memory_allocated``) and the memory each pool holds. ``--trace`` adds, for the first variant, the
allocations alive at the peak of the first 6 steps grouped by the code that made them
(``torch.cuda.memory._record_memory_history``), and what stays allocated after the model is freed.

GENERATED data (recbole_mamba.data.generated, 32 users of ~9,000 interactions), written to
``--gen_path``. Writes benchmarks/results/step_memory.{json,md} (or into $BENCHMARK_RESULTS).

    python benchmarks/step_memory.py --trace default,recompute,scratch512,recompute_scratch512,sasrec
"""

import argparse
import collections
import gc
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import lifelong  # noqa: E402

from recbole_mamba.nn.mamba_mixer import median_cuda_ms  # noqa: E402

LENGTH, WINDOWS, UNTIMED_STEPS, TIMED_STEPS = 2048, 32, 6, 30


def _batches_and_model(variant, gen_path):
    args = lifelong.parse_args([f"--gen_path={gen_path}", "--data_path=unused", "--ml1m_length=0",
                                "--scan_kernel=triton", "--gen_users=32", "--gen_mean_length=9000",
                                f"--tokens_per_batch={LENGTH * WINDOWS}",
                                f"--recompute_scan_inputs={'recompute' in variant}"])
    name = lifelong.generated_data(args)
    config = lifelong.create_config("RecMamba", name, config_dict=lifelong.model_settings(args, name, LENGTH))
    train, _, _ = lifelong.prepare_dataloaders(config, lifelong.load_dataset(config))
    full = [b for b in itertools.islice(iter(train), 8) if b[config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]].shape[0] == WINDOWS]
    if "scratch" in variant:
        from recbole_mamba.nn import triton_scan

        triton_scan.BACKWARD_SCRATCH_BYTES = int(variant.split("scratch")[1]) * 2**20
    encoder = "SASRec encoder (RecBole)" if variant == "sasrec" else "RecMamba"
    return [b.to("cuda") for b in full[:4]], lifelong.build_model(encoder, config, train.dataset)


def _made_by(frames):
    """Where an allocation was made: the innermost frame of this project, and the innermost of all."""
    ours = [f for f in frames if "recbole_mamba" in f["filename"] or "benchmarks" in f["filename"]]
    name = lambda f: f"{os.path.basename(f['filename'])}:{f['line']} ({f['name']})"  # noqa: E731
    return f"{name(ours[0]) if ours else '?'} <- {name(frames[0]) if frames else '?'}"


def _live_at_peak(snapshot):
    """MiB alive at the peak of the recorded allocations, grouped by the code that made them."""
    events = snapshot["device_traces"][0]
    live, total, peak, peak_index = {}, 0, 0, 0
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
            if total > peak:
                peak, peak_index = total, i
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])
    alive = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_requested":
            alive.pop(event["addr"], None)
    groups = collections.Counter()
    for event in alive.values():
        groups[_made_by(event.get("frames", []))] += event["size"] / 2**20
    return {"peak_mib": peak / 2**20, "by_code_mib": dict(groups.most_common(25))}


def _still_allocated(snapshot):
    groups = collections.Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                groups[f"pool {segment.get('segment_pool_id')}: {_made_by(block.get('frames', []))}"] += block["size"] / 2**20
    return dict(groups.most_common(15))


def measure(variant, gen_path, trace):
    """One variant, in this process: the result row (a dict)."""
    if trace:
        torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    batches, model = _batches_and_model(variant, gen_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    row = {"variant": variant}

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
        optimizer.step()

    for i in range(UNTIMED_STEPS):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    if trace:
        row["at_peak_of_first_steps"] = _live_at_peak(torch.cuda.memory._snapshot())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cycle = itertools.cycle(batches)
    step_ms = median_cuda_ms(lambda: step(next(cycle)), warmup=0, reps=TIMED_STEPS)
    pools = collections.Counter()
    for segment in torch.cuda.memory_snapshot():
        pools[str(segment.get("segment_pool_id"))] += segment["total_size"] / 2**30
    row.update(step_ms=step_ms, peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
               peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30, pools_gib=dict(pools))
    if trace:
        model = optimizer = batches = None
        gc.collect()
        torch.cuda.empty_cache()
        row["allocated_after_free_gib"] = torch.cuda.memory_allocated() / 2**30
        row["still_allocated_mib"] = _still_allocated(torch.cuda.memory._snapshot())
    return row


def table(rows):
    sasrec = next((r for r in rows if r["variant"] == "sasrec" and "error" not in r), None)
    lines = ["| variant | ms / step | peak GiB (reserved) | peak GiB (allocated) | CUDA graph pool GiB | vs SASRec: time / reserved |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        graph_pool = sum(v for k, v in r["pools_gib"].items() if k != "(0, 0)")
        ratio = (f"{sasrec['step_ms'] / r['step_ms']:.2f}x faster / {r['peak_reserved_gib'] / sasrec['peak_reserved_gib']:.3f}x"
                 if sasrec and r is not sasrec else "")
        lines.append(f"| {r['variant']} | {r['step_ms']:.2f} | {r['peak_reserved_gib']:.3f} | {r['peak_allocated_gib']:.3f} "
                     f"| {graph_pool:.3f} | {ratio} |")
    for r in rows:
        if "at_peak_of_first_steps" in r:
            peak = r["at_peak_of_first_steps"]
            lines += ["", f"Alive at the peak of {r['variant']}'s first {UNTIMED_STEPS} steps ({peak['peak_mib']:.0f} MiB), "
                      "by the code that allocated it:", "", "| MiB | allocated by (ours <- innermost) |", "|---|---|"]
            lines += [f"| {mib:.1f} | {where} |" for where, mib in peak["by_code_mib"].items()]
            lines += ["", f"Allocated after the model is freed: {r['allocated_after_free_gib']:.3f} GiB", "",
                      "| MiB | allocated by |", "|---|---|"]
            lines += [f"| {mib:.1f} | {where} |" for where, mib in r["still_allocated_mib"].items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", help="comma-separated: default, recompute, scratch<MiB>, recompute_scratch<MiB>, sasrec")
    parser.add_argument("--trace", action="store_true", help="attribute the first variant's peak memory")
    parser.add_argument("--gen_path", default="/tmp/step_memory_data", help="folder for the generated data")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant in this process
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it measures GPU memory and time")
    variants = args.variants.split(",")
    for variant in variants:
        if not (variant in ("default", "recompute", "sasrec") or variant.split("scratch")[-1].isdigit()):
            parser.error(f"unknown variant {variant!r}: use default, recompute, scratch<MiB>, recompute_scratch<MiB> or sasrec")
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args.gen_path, args.trace)), flush=True)
        return 0
    env = _report.environment()
    rows = []
    for i, variant in enumerate(variants):
        command = [sys.executable, __file__, args.variants, f"--gen_path={args.gen_path}", f"--one={variant}"]
        done = subprocess.run(command + (["--trace"] if args.trace and i == 0 else []), capture_output=True, text=True)
        row = next((json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")), None)
        rows.append(row or {"variant": variant, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"})
        print(rows[-1], flush=True)
    _report.write("step_memory", env, rows, table(rows), notes=(
        f"L = {LENGTH}, {WINDOWS} windows a batch, hidden size 64, 2 layers, CE loss (ce_kernel auto), GENERATED data "
        f"(recbole_mamba.data.generated). Each variant in a fresh process; {TIMED_STEPS} steps timed after {UNTIMED_STEPS}, "
        "batches already on the GPU (no data loading)."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
