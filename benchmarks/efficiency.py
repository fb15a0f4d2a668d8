"""Training efficiency of Mamba4Rec against RecBole's SASRec, BERT4Rec and GRU4Rec, on one GPU.

Everything runs in one process on one GPU, with ``torch.cuda.synchronize()`` around every timed
region and warm-up steps before it.

1. ``epoch``: each run trains one epoch through RecBole's own Trainer (the plugin's subclass, which
   only adds ``amp_dtype``) on the same dataset object (ml-1m by default), MAX_ITEM_LIST_LENGTH
   200, train_batch_size 2048, hidden size 64, CE loss, every other setting at the model's
   defaults (RecBole's for the baselines: 2 layers, 2 heads, inner size 256). Reports trainable
   parameters, seconds per training epoch, peak allocated GPU memory during that epoch
   (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, parameters and
   optimizer state included), full-ranking evaluation time on the validation split, and the
   ratios to SASRec. A run is a model name with optional settings, e.g.
   ``Mamba4Rec[enable_amp=true,amp_dtype=bfloat16]``.
2. ``sweep``: the encoders alone (benchmarks/_peers.py: two Mamba4Rec layers, RecBole's SASRec
   encoder, a flash-attention causal transformer; hidden 64, 2 layers), forward + backward, at
   L = 200, 512, 2048, 8192 with batch x length held at 131,072 tokens, in float32 and under
   bfloat16 autocast: median ms per step and peak memory, plotted against L.
3. ``profile`` (optional): torch.profiler over training steps of the given runs, data loading
   included, and the time one epoch spends just loading batches onto the GPU.

Writes benchmarks/results/efficiency.{json,md} (rewritten after every run, so an interrupted
benchmark keeps what it measured), efficiency_sweep.png (when matplotlib is installed; redraw
with ``--plot``) and efficiency_profile.txt.

    python benchmarks/efficiency.py --data_path=/path/to/datasets          # ml-1m in <data_path>/ml-1m
    python benchmarks/efficiency.py --data_path=... --runs SASRec "Mamba4Rec[enable_amp=true,amp_dtype=bfloat16]"
    python benchmarks/efficiency.py --plot                                  # redraw the PNG from the JSON
"""

import argparse
import copy
import gc
import itertools
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
import _report  # noqa: E402

from recbole_mamba.quick_start import count_trainable_parameters, create_config  # noqa: E402
from recbole_mamba.trainer import get_trainer  # noqa: E402

NAME = "efficiency"
DEFAULT_RUNS = ["Mamba4Rec", "SASRec", "BERT4Rec", "GRU4Rec"]
PROTOCOL = {
    "MAX_ITEM_LIST_LENGTH": 200,
    "train_batch_size": 2048,
    "hidden_size": 64,
    "loss_type": "CE",
    "train_neg_sample_args": None,
    "epochs": 1,
    "show_progress": False,
    "log_wandb": False,
}
SWEEP_LENGTHS = (200, 512, 2048, 8192)
SWEEP_TOKENS = 131_072


def parse_run(spec):
    """'Model[key=value,key=value]' -> (model, {key: value}); values are read as YAML."""
    match = re.fullmatch(r"(\w+)(?:\[(.*)\])?", spec.strip())
    if not match:
        raise SystemExit(f"bad run {spec!r}: expected Model or Model[key=value,...]")
    settings = {}
    for pair in filter(None, (match.group(2) or "").split(",")):
        key, _, value = pair.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return match.group(1), settings


# Without a GPU the script still runs (a smoke test of the code on tiny data); its numbers then
# mean nothing, and memory reads 0.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def synchronized_time():
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak_memory():
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else 0.0


def free_gpu():
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


# --- 1. one training epoch through RecBole's Trainer -------------------------------------------


# Settings that change the dataloaders rather than the model: runs that agree on these share them.
# (``transform``: BERT4Rec's dataloaders mask the sequences for it; ``train_mode``: windows or prefix rows.)
DATA_KEYS = ("MAX_ITEM_LIST_LENGTH", "train_batch_size", "eval_batch_size", "worker", "seed", "transform",
             "train_mode")


class SharedData:
    """Builds the dataset once and the dataloaders once per distinct data setting.

    RecBole's ``data_preparation`` converts the dataset in place, so each new data setting starts
    from a deep copy of the dataset as it was loaded.
    """

    def __init__(self):
        self.dataset, self.loaders = None, {}

    def loaders_for(self, config):
        from recbole.data import create_dataset

        from recbole_mamba.data import data_preparation  # RecBole's, honouring train_mode

        key = tuple(str(config[k]) for k in DATA_KEYS)
        if key not in self.loaders:
            if self.dataset is None:
                self.dataset = create_dataset(config)
            self.loaders[key] = data_preparation(config, copy.deepcopy(self.dataset))
        return self.loaders[key]


def build(spec, dataset_name, data_path, checkpoint_dir, shared):
    """Config, dataloaders and trainer for one run."""
    from recbole.utils import init_seed

    model_name, settings = parse_run(spec)
    config = create_config(model_name, dataset_name, config_dict={
        **PROTOCOL, "data_path": data_path, "checkpoint_dir": checkpoint_dir, **settings})
    train_data, valid_data, _ = shared.loaders_for(config)
    init_seed(config["seed"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config)(config, model)
    return config, trainer, train_data, valid_data


def time_epoch(trainer, train_data, valid_data, warmup_steps):
    # Warm-up through the same code path (RecBole's _train_epoch iterates whatever it is given).
    trainer._train_epoch(itertools.islice(train_data, warmup_steps), epoch_idx=0)
    reset_peak_memory()
    start = synchronized_time()
    trainer._train_epoch(train_data, epoch_idx=1)
    epoch_s = synchronized_time() - start
    peak = peak_memory_gib()
    start = synchronized_time()
    result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    eval_s = synchronized_time() - start
    return {"epoch_s": epoch_s, "peak_gib": peak, "eval_s": eval_s,
            "batches": len(train_data), "valid": {k: float(v) for k, v in result.items()}}


def add_ratios(rows):
    # The first SASRec run (RecBole's defaults when listed first) is the reference.
    base = next((r for r in rows if parse_run(r["run"])[0] == "SASRec" and "epoch_s" in r), None)
    for row in rows:
        if base and "epoch_s" in row:
            row["time_vs_sasrec"] = row["epoch_s"] / base["epoch_s"]
            if base["peak_gib"] > 0:  # 0 without a GPU
                row["memory_vs_sasrec"] = row["peak_gib"] / base["peak_gib"]


def epoch_table(rows):
    lines = ["| run | parameters | s / epoch | peak GiB | eval s (valid) | time vs SASRec | memory vs SASRec | valid NDCG@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | | {r['error']} | | | | | |")
            continue
        ratio = (lambda k: f"{r[k]:.2f}x" if k in r else "")
        lines.append(f"| {r['run']} | {r['parameters']:,} | {r['epoch_s']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['eval_s']:.2f} | {ratio('time_vs_sasrec')} | {ratio('memory_vs_sasrec')} | "
                     f"{r['valid'].get('ndcg@10', float('nan')):.4f} |")
    return "\n".join(lines)


# --- 2. the encoders alone, against sequence length -------------------------------------------


def sweep_encoders(hidden=64, layers=2, heads=2, inner=256, dropout=0.2, backend="cuda" if ON_GPU else "torch"):
    return {
        "Mamba4Rec layers": lambda: _peers.mamba_encoder(hidden, layers, backend, dropout),
        "SASRec encoder (RecBole)": lambda: _peers.SASRecEncoder(hidden, layers, heads, inner, dropout),
        "flash-attention transformer": lambda: _peers.FlashTransformer(hidden, layers, heads, inner, dropout),
    }


def time_encoder(make, batch, length, dtype, steps, warmup=3):
    module = make().to(DEVICE).train()
    x = torch.randn(batch, length, 64, device=DEVICE, requires_grad=True)
    grad = torch.randn(batch, length, 64, device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = module(x)
        y.backward(grad.to(y.dtype))

    for _ in range(warmup):
        step()
    reset_peak_memory()
    times = []
    for _ in range(steps):
        start = synchronized_time()
        step()
        times.append(synchronized_time() - start)
    return statistics.median(times) * 1000, peak_memory_gib()


def run_sweep(rows, steps, write, lengths=SWEEP_LENGTHS, tokens=SWEEP_TOKENS):
    for dtype, length in itertools.product(("fp32", "bf16"), lengths):
        for name, make in sweep_encoders().items():
            row = {"encoder": name, "dtype": dtype, "length": length, "batch": tokens // length}
            try:
                row["ms"], row["peak_gib"] = time_encoder(make, row["batch"], length, dtype, steps)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            free_gpu()
            rows.append(row)
            print(row, flush=True)
            write()


def sweep_table(rows):
    lines = ["| dtype | L | batch | encoder | ms / step | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['ms']:.1f} | {r['peak_gib']:.2f}" if "ms" in r else f"{r['error']} |"
        lines.append(f"| {r['dtype']} | {r['length']} | {r['batch']} | {r['encoder']} | {value} |")
    return "\n".join(lines)


def plot_sweep(rows, path):
    plt = _report.pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, dtype), style in zip(itertools.product(sweep_encoders(), ("fp32", "bf16")),
                                    itertools.cycle(["-o", "--o"])):
        points = [r for r in rows if r["encoder"] == name and r["dtype"] == dtype and "ms" in r]
        if not points:
            continue
        lengths = [r["length"] for r in points]
        label = f"{name} ({dtype})"
        axes[0].plot(lengths, [r["ms"] for r in points], style, label=label)
        axes[1].plot(lengths, [r["peak_gib"] for r in points], style, label=label)
    _report.against_length(axes, f"sequence length L (batch x L = {SWEEP_TOKENS:,})",
                           ("ms per step (forward + backward)", "peak GPU memory (GiB)"))
    axes[0].legend(fontsize=7)
    fig.suptitle("Encoders alone: hidden 64, 2 layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --- 3. where the time goes -------------------------------------------------------------------


def profile_run(trainer, train_data, steps=20):
    from torch.profiler import ProfilerActivity, profile

    trainer._train_epoch(itertools.islice(train_data, 5), epoch_idx=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        trainer._train_epoch(itertools.islice(train_data, steps), epoch_idx=0)
        synchronized_time()
    sort_by = "cuda_time_total" if ON_GPU else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)


def time_data_loading(train_data, device):
    """Seconds to iterate one epoch of batches and copy them to the GPU, with no model."""
    start = synchronized_time()
    for interaction in train_data:
        interaction.to(device)
    return synchronized_time() - start


# --- main ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", help="folder holding <dataset>/<dataset>.inter")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="Model or Model[key=value,...]")
    parser.add_argument("--warmup_steps", type=int, default=20)
    parser.add_argument("--sweep_steps", type=int, default=10, help="timed steps per sweep point")
    parser.add_argument("--parts", default="epoch,sweep", help="comma-separated, run in this order: epoch, sweep, profile")
    parser.add_argument("--profile_runs", nargs="*", default=["Mamba4Rec"])
    parser.add_argument("--name", default=NAME, help="results file name (without extension)")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from results/<name>.json")
    parser.add_argument("--sweep_lengths", default=",".join(map(str, SWEEP_LENGTHS)))
    parser.add_argument("--sweep_tokens", type=int, default=SWEEP_TOKENS)
    args = parser.parse_args()

    png = _report.RESULTS / f"{args.name}_sweep.png"
    if args.plot:
        plot_sweep(json.loads((_report.RESULTS / f"{args.name}.json").read_text())["results"]["sweep"], png)
        return
    if not ON_GPU:
        print("no CUDA GPU: running as a smoke test; the numbers mean nothing", flush=True)
    parts = args.parts.split(",")
    unknown = set(parts) - {"epoch", "profile", "sweep"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}: use epoch, profile, sweep")
    if set(parts) & {"epoch", "profile"} and not args.data_path:
        raise SystemExit("--data_path is needed for the epoch and profile parts")

    env = _report.environment()
    results = {"protocol": {**PROTOCOL, "dataset": args.dataset, "warmup_steps": args.warmup_steps,
                            "sweep_tokens": args.sweep_tokens}, "epoch": [], "sweep": []}

    def write():
        add_ratios(results["epoch"])
        tables = []
        if results["epoch"]:
            tables += [f"## One training epoch ({args.dataset}, L=200, batch 2048, the plugin's Trainer: RecBole's, without a sync per batch)", "",
                       epoch_table(results["epoch"]), ""]
        if results["sweep"]:
            tables += [f"## Encoders alone (batch x L = {args.sweep_tokens:,}, forward + backward)", "",
                       sweep_table(results["sweep"]), ""]
        _report.write(args.name, env, results, "\n".join(tables), notes=(
            "Times: torch.cuda.synchronize() before and after every timed region, after warm-up steps. "
            "Peak: torch.cuda.max_memory_allocated() during the timed epoch/steps, parameters and "
            "optimizer state included."))

    shared = SharedData()
    checkpoint_dir = tempfile.mkdtemp()  # RecBole's Trainer wants one; nothing is saved in it
    for part in parts:  # in the order given
        if part == "epoch":
            for spec in args.runs:
                row = {"run": spec}
                try:
                    config, trainer, train_data, valid_data = build(
                        spec, args.dataset, args.data_path, checkpoint_dir, shared)
                    row["parameters"] = count_trainable_parameters(trainer.model)
                    row["backend"] = getattr(trainer.model, "backend", None)
                    row["anomaly_detection"] = torch.is_anomaly_enabled()
                    row.update(time_epoch(trainer, train_data, valid_data, args.warmup_steps))
                    del trainer, train_data, valid_data
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                free_gpu()
                results["epoch"].append(row)
                print(row, flush=True)
                write()
        elif part == "profile":
            profiles = []
            for spec in args.profile_runs:
                config, trainer, train_data, _ = build(spec, args.dataset, args.data_path,
                                                       checkpoint_dir, shared)
                loading = time_data_loading(train_data, config["device"])
                results.setdefault("data_loading_s", {})[spec] = loading
                profiles.append(f"## {spec}: 20 training steps (data loading included)\n"
                                f"one epoch of batch loading alone: {loading:.2f} s\n\n"
                                + profile_run(trainer, train_data))
                del trainer, train_data
                free_gpu()
                write()
                (_report.RESULTS / f"{args.name}_profile.txt").write_text("\n\n".join(profiles) + "\n")
        elif part == "sweep":
            run_sweep(results["sweep"], args.sweep_steps, write,
                      [int(v) for v in args.sweep_lengths.split(",")], args.sweep_tokens)
            plot_sweep(results["sweep"], png)
    write()


if __name__ == "__main__":
    main()
