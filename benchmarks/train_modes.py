"""Time to accuracy of Mamba4Rec's two training modes, through RecBole's Trainer.

For ``train_mode`` prefix (RecBole's one sample per target) and all_positions (one sample per
window, a loss at every position), on the same data, split and model settings: the seconds of
each training epoch, and validation and test metrics (full ranking, RecBole's evaluation) after
each epoch. Writes benchmarks/results/train_modes.{json,md}.

    python benchmarks/train_modes.py                      # ml-100k, L=50: about 9 minutes on 2 cores
    python benchmarks/train_modes.py --prefix-epochs 0 --epochs 30 --dataset ml-1m --data-path DIR --max-len 200
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole.data import create_dataset  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_mamba.data import data_preparation  # noqa: E402
from recbole_mamba.quick_start import create_config  # noqa: E402


def train_and_evaluate(mode, epochs, settings):
    """Train ``epochs`` epochs in ``mode``; return one row per epoch (time and metrics)."""
    config = create_config("Mamba4Rec", settings["dataset"], config_dict={**settings["config"], "train_mode": mode})
    init_seed(config["seed"], config["reproducibility"])
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = config.model_class(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    rows, total = [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        valid = trainer.evaluate(valid_data, load_best_model=False)
        test = trainer.evaluate(test_data, load_best_model=False)
        rows.append({
            "train_mode": mode, "epoch": epoch + 1, "epoch_s": round(seconds, 2), "train_s": round(total, 2),
            "samples": train_data.sample_size, "batches": len(train_data), "loss": round(float(loss), 4),
            "valid": {k: round(float(v), 4) for k, v in valid.items()},
            "test": {k: round(float(v), 4) for k, v in test.items()},
        })
        print(rows[-1], flush=True)
    return rows


def markdown(rows):
    metrics = list(rows[0]["test"])
    head = ["train_mode", "epoch", "epoch (s)", "training so far (s)", "samples", "batches"]
    head += [f"valid {m}" for m in metrics] + [f"test {m}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["train_mode"], r["epoch"], f"{r['epoch_s']:.1f}", f"{r['train_s']:.1f}", r["samples"], r["batches"]]
        cells += [f"{r['valid'][m]:.4f}" for m in metrics] + [f"{r['test'][m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", default=None, help="folder holding <dataset>/ (ml-100k: RecBole's copy)")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="prefix rows or windows per batch")
    parser.add_argument("--prefix-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=15, help="all_positions epochs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a busy machine, 1 is faster than oversubscribed cores)")
    parser.add_argument("--name", default="train_modes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = {
        "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": args.batch_size, "eval_batch_size": 1024,
        "show_progress": False, "worker": 0,
    }
    if args.data_path:
        config["data_path"] = args.data_path
    settings = {"dataset": args.dataset, "config": config}
    env = _report.environment()
    env["load_average_before"] = tuple(round(x, 2) for x in os.getloadavg())
    rows = []
    if args.epochs:
        rows += train_and_evaluate("all_positions", args.epochs, settings)
    if args.prefix_epochs:
        rows += train_and_evaluate("prefix", args.prefix_epochs, settings)
    env["load_average_after"] = tuple(round(x, 2) for x in os.getloadavg())
    notes = (
        f"Mamba4Rec with its defaults (hidden 64, 1 layer, CE, dropout 0.2, Adam lr 1e-3) on {args.dataset}, "
        f"MAX_ITEM_LIST_LENGTH {args.max_len}, {args.batch_size} prefix rows or windows per batch; "
        "metrics of the model after each epoch (no early stopping), full ranking, leave-one-out. "
        f"Load average (1, 5, 15 min) before: {env['load_average_before']}, after: {env['load_average_after']} "
        "(the machine is shared: timings vary with its load)."
    )
    paths = _report.write(args.name, env, rows, markdown(rows), notes)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
