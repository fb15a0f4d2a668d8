"""Accuracy and time to accuracy: full training runs through RecBole's Trainer, early stopping on validation.

Each run trains a model on one dataset with the plugin's protocol (``yaml/overall.yaml``: 5-core,
leave-one-out in time order, full ranking) and the dataset's preset, validates after every epoch
and stops after ``stopping_step`` epochs without a better validation NDCG@10 (RecBole's early
stopping), after ``--epochs``, or at the first validation past ``--time_limit`` seconds. It records:

- every epoch: the wall time since training started (training and validation; checkpoint writing
  included, as in any real run) and the validation NDCG@10;
- at every epoch that improved validation, the test metrics of that model (the clock is paused
  meanwhile): what the run would report had it stopped there;
- at the end, the test metrics of the best validation epoch (reloaded from RecBole's checkpoint),
  the time to reach that epoch, and why the run stopped.

A run is a model with optional settings, as in efficiency.py: ``"Mamba4Rec[train_mode=all_positions]"``.
Runs are listed in ``--runs`` and run one after another; to use several GPUs, start one process per
GPU with its own ``--name`` and ``--gpu_id``, then ``--report FILE.json...`` joins their JSON files into one
table (``accuracy.md``) and a plot of validation NDCG@10 against wall time (``accuracy.png``).

    python benchmarks/accuracy.py --dataset=ml-1m --data_path=/data --name=accuracy-ml-1m \\
        --runs "Mamba4Rec" "Mamba4Rec[train_mode=all_positions,train_batch_size=64]" SASRec
    python benchmarks/accuracy.py --report benchmarks/results/accuracy_runs/*.json

With ``--state_dir DIR`` a run longer than one sitting (or one call to a lent GPU) is trained in
segments: each invocation of the same command trains for up to ``--time_limit`` seconds, saves the
resumable checkpoint and what it recorded in ``DIR/run<i>/``, and the next one continues from there
(the plugin's ``--resume``); times add up over segments, without the data loading of each. A
finished run is not trained again.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from efficiency import parse_run  # noqa: E402

from recbole_mamba.quick_start import build_data_and_model, count_trainable_parameters, create_config  # noqa: E402
from recbole_mamba.trainer import get_trainer  # noqa: E402

METRICS = ("hit@10", "ndcg@10", "mrr@10")


class TimeLimitReached(Exception):
    """Raised from RecBole's per-epoch callback (after the best model is saved) to end a run."""


class RunClock:
    """Wall time since training started, synchronised with the GPU, with pauses not counted."""

    def __init__(self, offset=0.0):
        self.start, self.paused, self.offset = None, 0.0, offset  # offset: time of earlier segments

    @staticmethod
    def _now():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self):
        self.start = self._now()

    def elapsed(self):
        return self._now() - self.start - self.paused + self.offset

    def pause(self):
        return _Pause(self)


class _Pause:
    def __init__(self, clock):
        self.clock = clock

    def __enter__(self):
        self.t0 = self.clock._now()

    def __exit__(self, *exc):
        self.clock.paused += self.clock._now() - self.t0


def plain(result):
    return {key: round(float(value), 6) for key, value in result.items()}


def train_one(spec, dataset_name, data_path, args, checkpoint_dir, progress_file=None):
    """Train one run; with ``progress_file``, continue it from where an earlier invocation stopped."""
    progress = json.loads(progress_file.read_text()) if progress_file and progress_file.is_file() else None
    if progress and progress["spec"] != spec:
        raise SystemExit(f"{progress_file} belongs to run {progress['spec']!r}, not {spec!r}: use another --state_dir")
    if progress and progress.get("row"):
        print("  finished in an earlier invocation", flush=True)
        return progress["row"]
    model_name, settings = parse_run(spec)
    config_dict = {
        "data_path": data_path,
        "checkpoint_dir": checkpoint_dir,
        "epochs": args.epochs,
        "show_progress": False,
        "log_wandb": False,
        **({"gpu_id": args.gpu_id} if args.gpu_id is not None else {}),
        **({"resume": progress["last_checkpoint"]} if progress else {}),
        **settings,
    }
    config = create_config(model_name, dataset_name, config_dict=config_dict)
    _, (train_data, valid_data, test_data), model = build_data_and_model(config)
    trainer = get_trainer(config)(config, model)
    if progress:
        trainer.resume_checkpoint(progress["last_checkpoint"])
        print(f"  resuming after epoch {progress['epochs'][-1]['epoch']} ({progress['elapsed_s']:.1f} s)", flush=True)

    clock = RunClock(offset=progress["elapsed_s"] if progress else 0.0)
    segment = progress.get("segments", 1) + 1 if progress else 1  # invocations this run has trained in
    epochs, improvements = (progress["epochs"], progress["improvements"]) if progress else ([], [])

    def record_progress(row=None):
        # Times up to the last finished epoch, which the resumable checkpoint holds; ``row``: the run is done.
        save_progress(progress_file, {"spec": spec, "epochs": epochs, "improvements": improvements,
                                      "elapsed_s": epochs[-1]["elapsed_s"], "last_checkpoint": trainer.last_model_file,
                                      "segments": segment, "row": row})

    def after_validation(epoch_idx, valid_score):
        elapsed = clock.elapsed()
        epochs.append({"epoch": epoch_idx, "elapsed_s": round(elapsed, 3), "valid_ndcg@10": round(float(valid_score), 6)})
        print(f"  epoch {epoch_idx}: {elapsed:.1f} s, valid NDCG@10 {valid_score:.4f}", flush=True)
        with clock.pause():
            if trainer.cur_step == 0:  # this epoch is the new best (RecBole has just saved it)
                test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
                improvements.append({"epoch": epoch_idx, "elapsed_s": round(elapsed, 3), "test": plain(test)})
            if progress_file:  # the state after this epoch, and what was recorded up to it
                trainer._save_last_checkpoint(epoch_idx)
                record_progress()
        if args.time_limit and elapsed - clock.offset > args.time_limit:
            raise TimeLimitReached

    clock.begin()
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=after_validation)
        stopped = "early stopping" if epochs[-1]["epoch"] + 1 < config["epochs"] else "max epochs"
    except TimeLimitReached:
        stopped = f"time limit ({args.time_limit} s)" + (", resumable" if progress_file else "")
    total_s = clock.elapsed()
    test = plain(trainer.evaluate(test_data, load_best_model=True, model_file=trainer.saved_model_file,
                                  show_progress=False))
    best = improvements[-1]
    row = {
        "run": spec,
        "model": model_name,
        "dataset": dataset_name,
        "train_mode": config["train_mode"],
        "seed": config["seed"],
        "settings": {key: config[key] for key in (
            "MAX_ITEM_LIST_LENGTH", "train_batch_size", "learning_rate", "hidden_size", "num_layers", "n_layers",
            "dropout_prob", "hidden_dropout_prob", "loss_type", "stopping_step", "epochs", "enable_amp", "amp_dtype",
        ) if key in config.final_config_dict},
        "overrides": settings,
        "trainable_parameters": count_trainable_parameters(model),
        "training_samples_per_epoch": train_data.sample_size,
        "batches_per_epoch": len(train_data),
        "best_epoch": best["epoch"],
        "time_to_best_s": best["elapsed_s"],
        "total_s": round(total_s, 3),
        "epochs_run": len(epochs),
        "stopped": stopped,
        "test": test,
        "valid_at_best": plain(trainer.best_valid_result),
        "epochs": epochs,
        "test_at_improvements": improvements,
        "segments": segment,
    }
    if progress_file:
        record_progress(row=None if stopped.startswith("time limit") else row)
    return row


def save_progress(path, state):
    """Write ``state`` as JSON atomically: a kill never leaves a half-written progress file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def first_reaching(row, targets):
    """(epoch, seconds) of the first improvement whose test metrics reach ``targets``, or None."""
    for point in row["test_at_improvements"]:
        if all(point["test"][key] >= value for key, value in targets.items()):
            return point["epoch"], point["elapsed_s"]
    return None


# The published Mamba4Rec figures on ml-1m (arXiv 2403.03900, Table 2), the target of all-position training.
PUBLISHED_ML1M = {"hit@10": 0.3121, "ndcg@10": 0.1822}


def markdown(rows):
    lines = [
        "| dataset | run | train_mode | epochs run (stopped) | best epoch | time to best (s) | s per epoch "
        "| test hit@10 | test ndcg@10 | test mrr@10 | ml-1m: first at the published figures (epoch, s) | GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_epoch = row["total_s"] / max(row["epochs_run"], 1)
        reached = first_reaching(row, PUBLISHED_ML1M) if row["dataset"] == "ml-1m" else None
        cells = [row["dataset"], f"`{row['run']}`", row["train_mode"], f"{row['epochs_run']} ({row['stopped']})",
                 str(row["best_epoch"]), f"{row['time_to_best_s']:.1f}", f"{per_epoch:.2f}",
                 *(f"{row['test'][m]:.4f}" for m in METRICS),
                 f"{reached[0]}, {reached[1]:.1f}" if reached else "-", row.get("conditions", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(paths):
    """Join result JSON files into results/accuracy.{md,json} and accuracy.png."""
    blocks, rows = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        env = data["environment"]
        conditions = env.get("conditions", "")
        blocks.append(f"- `{Path(path).name}`: {env['date']}, {env['device']}, git {env['git_revision']}"
                      + (f", {conditions}" if conditions else "") + f"; `{env['command']}`")
        for row in data["results"]:
            rows.append({**row, "conditions": conditions, "source": Path(path).name})
    notes = (
        "Time is wall time from the start of training: training epochs, validation after each epoch and "
        "checkpoint writing (test evaluations at improvements are not counted). Test metrics are those of "
        "the best validation NDCG@10 epoch. 'first at the published figures': the first epoch that improved "
        "validation and whose model reaches the published Mamba4Rec test HR@10 0.3121 and NDCG@10 0.1822 "
        "on ml-1m ('-': never).\n\nRuns:\n" + "\n".join(blocks)
    )
    _report.write("accuracy", _report.environment(), rows, markdown(rows), notes)
    plot(rows)


def plot(rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    rows = [row for row in rows if "search" not in row.get("conditions", "")]  # hyperparameter trials: table only
    datasets = sorted({row["dataset"] for row in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for row in (r for r in rows if r["dataset"] == dataset):
            xs = [e["elapsed_s"] for e in row["epochs"]]
            extra = ",".join(f"{k}={v}" for k, v in row["overrides"].items() if k != "train_mode")
            label = f"{row['model']} {row['train_mode']}" + (f"\n({extra})" if extra else "")
            ax.plot(xs, [e["valid_ndcg@10"] for e in row["epochs"]], marker=".", label=label)
        ax.set_xscale("log")
        ax.set(title=dataset, xlabel="wall time since training started (s, log)", ylabel="validation NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = _report.RESULTS / "accuracy.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--data_path", help="folder holding <dataset>/<dataset>.inter")
    parser.add_argument("--runs", nargs="+", default=["Mamba4Rec"])
    parser.add_argument("--name", default="accuracy", help="results/<name>.{json,md}")
    parser.add_argument("--epochs", type=int, default=300, help="at most this many epochs per run")
    parser.add_argument("--time_limit", type=float, default=0, help="seconds; 0: none")
    parser.add_argument("--gpu_id", help="RecBole's gpu_id (which GPU of the machine)")
    parser.add_argument("--state_dir", help="keep checkpoints and progress here, so that the same command "
                        "continues runs stopped by --time_limit (or killed) where they stopped")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="join these result files into accuracy.{md,png}")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)

    env, rows = _report.environment(), []
    with tempfile.TemporaryDirectory() as scratch:
        for index, spec in enumerate(args.runs):
            print(f"{args.dataset}: {spec}", flush=True)
            checkpoint_dir, progress_file = scratch, None
            if args.state_dir:
                run_dir = Path(args.state_dir) / f"run{index}"
                run_dir.mkdir(parents=True, exist_ok=True)
                checkpoint_dir, progress_file = str(run_dir), run_dir / "progress.json"
            rows.append(train_one(spec, args.dataset, args.data_path, args, checkpoint_dir, progress_file))
            row = rows[-1]
            print(f"  best epoch {row['best_epoch']} at {row['time_to_best_s']:.1f} s, test {row['test']}", flush=True)
            _report.write(args.name, env, rows, markdown(rows))


if __name__ == "__main__":
    main()
