"""Lifelong sequences on one GPU: RecMamba against two attention encoders, as the history grows.

For each MAX_ITEM_LIST_LENGTH L (512, 2048, 8192, 16384 by default), on generated lifelong data
(recbole_mamba.data.generated: GENERATED, not real user behaviour; users of ~20,000 interactions,
so windows of every L are full) and on ml-1m at one long L:

- the same data path for every model: ``sequence_storage: flat``, ``train_mode: all_positions``
  windows of L items, ``tokens_per_batch // L`` windows a batch (so a batch holds about the same
  tokens at every L and an epoch is every training interaction once);
- the same model around the encoder: RecMamba's embedding (items x sqrt(d) + positions, dropout,
  LayerNorm) and its all-position loss (``--loss_type``: chunked full-softmax CE by default, or
  BCE / SampledSoftmax with sampled negatives), width 64, 2 layers, dropout 0.2
  (RecMamba's default) for all three, 2 heads and inner size 256 for attention (RecBole's SASRec
  defaults); only the layers differ (benchmarks/_peers.py): RecMamba's Mamba layers, RecBole's SASRec encoder
  (``TransformerEncoder`` with SASRec's causal mask), and a causal transformer whose attention is
  ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels);
- per model and L: seconds per training epoch (``torch.cuda.synchronize()`` around the timed
  batches, after one untimed epoch; with ``--max_batches`` or ``--time_limit`` only part of the epoch
  is timed and the epoch time is extrapolated from it, which the results say), tokens per second,
  peak memory (``torch.cuda.max_memory_reserved``: what PyTorch holds on the GPU, CUDA graphs'
  memory included, which ``max_memory_allocated``, also recorded, does not see); running out of
  memory is caught and recorded;
- RecMamba's ``cuda_graph`` (on by default: its encoder's training forward and backward replayed
  as CUDA graphs; ``--cuda_graph=False`` turns it off), ``scan_kernel`` (which scan ``auto``
  chose is recorded per row) and ``--recompute_scan_inputs=True`` (less memory, a slower step). The attention encoders run eagerly, as RecBole runs SASRec: graphing
  them did not change their step time at 2,048 (benchmarks/NOTES.md) and raised their memory.

Then RecMamba is trained on ml-1m at ``--accuracy_length`` through ``recbole_mamba.run`` (RecBole's
Trainer, full-ranking evaluation) for HR@10 / NDCG@10.

Writes benchmarks/results/lifelong.{json,md} (rewritten after every row) and lifelong.png (time
and memory against L), or into $BENCHMARK_RESULTS.

    python benchmarks/lifelong.py --data_path=/work/shared/datasets            # on the GPU (generated data: ./dataset)
    python benchmarks/lifelong.py --data_path=... --parts=speed --max_batches=30  # shorter
    python benchmarks/lifelong.py --data_path=... --parts=speed --bf16 --name=lifelong_bf16
    python benchmarks/lifelong.py --data_path=... --parts=profile               # lifelong_profile.txt: kernels per encoder
    python benchmarks/lifelong.py --smoke                                       # tiny, on a CPU
"""

import argparse
import copy
import gc
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
import _report  # noqa: E402

from recbole_mamba.config import Config  # noqa: E402
from recbole_mamba.data.generated import write_lifelong_dataset  # noqa: E402
from recbole_mamba.data.loading import load_dataset, prepare_dataloaders  # noqa: E402
from recbole_mamba.data.prefetch import BatchPrefetcher  # noqa: E402
from recbole_mamba.quick_start import count_trainable_parameters, create_config  # noqa: E402

NAME = "lifelong"
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ENCODERS = ("RecMamba", "SASRec encoder (RecBole)", "flash-attention transformer")
FULL = {
    "lengths": [512, 2048, 8192, 16384], "tokens_per_batch": 65536, "hidden_size": 64, "num_layers": 2,
    "gen_users": 128, "gen_items": 5000, "gen_mean_length": 20000, "ml1m_length": 2048,
    "accuracy_length": 2048, "accuracy_epochs": 30, "warmup_batches": 3, "loss_type": "CE",
    "profile_length": 2048, "profile_steps": 10, "scan_kernel": "auto", "cuda_graph": True,
    "recompute_scan_inputs": False,
}
# A CPU smoke test of the code: tiny data and model; its numbers mean nothing.
SMOKE = {
    "lengths": [16, 64], "tokens_per_batch": 256, "hidden_size": 16, "num_layers": 1,
    "gen_users": 6, "gen_items": 80, "gen_mean_length": 150, "ml1m_length": 0,
    "accuracy_length": 64, "accuracy_epochs": 1, "warmup_batches": 1, "max_batches": 2, "loss_type": "CE",
    "profile_length": 16, "profile_steps": 2, "scan_kernel": "auto", "cuda_graph": True,
    "recompute_scan_inputs": False,
}


def synchronized_time():
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


def free_gpu():
    # torch.compile (the fused element-wise ops) keeps tensors of its first calls alive (about 0.13 GiB
    # after a RecMamba at 2,048): drop them, so that every model and length starts from the same state.
    torch._dynamo.reset()
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_settings(args, data_name, length):
    data_path = args.gen_path if data_name.startswith("generated") else args.data_path
    return {
        "data_path": data_path, "MAX_ITEM_LIST_LENGTH": length, "hidden_size": args.hidden_size,
        "num_layers": args.num_layers, "train_batch_size": max(1, args.tokens_per_batch // length),
        "eval_batch_size": max(1, args.tokens_per_batch // length), "show_progress": False, "worker": 0,
        "mamba_backend": "auto" if ON_GPU else "torch", "scan_kernel": args.scan_kernel, "log_wandb": False,
        "loss_type": args.loss_type, "cuda_graph": args.cuda_graph, "recompute_scan_inputs": args.recompute_scan_inputs,
        # Keep every interaction of the generated data (its items are all used by many users).
        **({"user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"} if args.smoke else {}),
    }


def build_model(encoder, config, dataset):
    """RecMamba, or RecMamba with its Mamba layers replaced by an attention encoder of the same size."""
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    model = config.model_class(config, dataset)
    hidden, layers, dropout = config["hidden_size"], config["num_layers"], config["dropout_prob"]
    # RecBole's SASRec defaults: 2 heads, inner size 256 (= 4 x 64, as the Mamba layers' FFN).
    if encoder == "SASRec encoder (RecBole)":
        model.mamba_layers = nn.ModuleList([_peers.SASRecEncoder(hidden, layers, 2, 4 * hidden, dropout)])
    elif encoder == "flash-attention transformer":
        model.mamba_layers = nn.ModuleList([_peers.FlashTransformer(hidden, layers, 2, 4 * hidden, dropout)])
    if encoder != "RecMamba":
        model.cuda_graph = False
    return model.to(DEVICE)


def batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def train_step(model, optimizer, batch, bf16=False):
    """One optimisation step on ``batch``; returns its loss."""
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = model.calculate_loss(batch.to(DEVICE))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def time_training(model, loader, warmup, max_batches, time_limit, bf16=False):
    """Train one whole epoch (at least ``warmup`` batches) untimed, then time up to an epoch (or the caps).

    The untimed epoch shows the model every batch shape of the epoch (the last batch is usually
    smaller), so one-off work per shape (RecMamba's ``scan_kernel: auto`` timing, Triton
    compilation) happens there, as it would in a real run's first epoch, and not in the timed one.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    length_field = model.ITEM_SEQ_LEN
    model.train()

    def step(batch):
        return train_step(model, optimizer, batch, bf16)

    # As the plugin's Trainer does on a GPU: the next batches are built while the GPU trains.
    stream = batches(BatchPrefetcher(loader, torch.device(DEVICE)))
    for batch in itertools.islice(stream, max(warmup, len(loader))):
        step(batch)
    if ON_GPU:  # the peak is what the timed batches hold: no blocks cached from the untimed epoch
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    epoch_batches = len(loader)
    limit = min(epoch_batches, max_batches or epoch_batches)
    timed, tokens = 0, 0  # tokens: summed on the device (reading it per batch would wait for the GPU)
    start = synchronized_time()
    for batch in itertools.islice(stream, limit):
        tokens = tokens + batch[length_field].sum()
        loss = step(batch)
        timed += 1
        if time_limit and time.perf_counter() - start > time_limit:
            break
    seconds = synchronized_time() - start
    return {
        "timed_batches": timed, "epoch_batches": epoch_batches, "timed_s": seconds,
        "epoch_s": seconds / timed * epoch_batches, "extrapolated": timed < epoch_batches,
        "tokens_per_s": int(tokens) / seconds, "loss": float(loss),
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if ON_GPU else 0.0,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else 0.0,
        "cuda_graph": graph_used(model), "scan_kernel": scan_kernels_used(model, loader),
    }


def graph_used(model):
    """Whether the timed steps replayed the encoder as a CUDA graph."""
    graph = getattr(model, "_training_graph", None)
    return graph is not None and graph.built


def scan_kernels_used(model, loader):
    """The selective scan(s) the model's Mamba layers ran on the loader's full batches ('' for
    attention encoders): the configured kernel, or what ``auto`` measured faster."""
    from recbole_mamba.nn.mamba_mixer import MambaMixer

    batch, length = loader.config["train_batch_size"], loader.config["MAX_ITEM_LIST_LENGTH"]
    kernels = {mixer.scan_kernel_chosen(batch, length, training=True)
               for mixer in model.modules() if isinstance(mixer, MambaMixer)}
    return ",".join(sorted(k for k in kernels if k))


def speed_rows(args, data_name, lengths, rows, write):
    loaded = None
    for length in lengths:
        settings = model_settings(args, data_name, length)
        if loaded is None:  # read (and check) the files once: millions of lines for the generated data
            config = create_config("RecMamba", data_name, config_dict=settings)
            loaded = load_dataset(config)
        else:
            config = Config("RecMamba", data_name, config_dict=settings)
        # The flat storage reads MAX_ITEM_LIST_LENGTH when it is built (data_preparation builds it
        # in place), so each length builds a copy of the loaded dataset, given that length.
        dataset = copy.deepcopy(loaded)
        dataset.config, dataset.max_item_list_len = config, length
        train, _, _ = prepare_dataloaders(config, dataset)
        for encoder in args.encoders:
            row = {"data": data_name, "length": length, "model": encoder, "windows_per_batch": config["train_batch_size"],
                   "dtype": "bf16 autocast" if args.bf16 else "fp32"}
            try:
                model = build_model(encoder, config, train.dataset)
                row["parameters"] = count_trainable_parameters(model)
                row.update(time_training(model, train, args.warmup_batches, args.max_batches, args.time_limit,
                                         args.bf16))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            model = None
            free_gpu()
            if ON_GPU:  # what the next row starts with (0 unless something outlives its model)
                row["allocated_after_free_gib"] = torch.cuda.memory_allocated() / 2**30
            rows.append(row)
            print(row, flush=True)
            write()


def profile_tables(args, data_name):
    """torch.profiler over ``profile_steps`` training steps of each encoder at ``profile_length``:
    the kernels that take the GPU's time, after the untimed warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    config = create_config("RecMamba", data_name, config_dict=model_settings(args, data_name, args.profile_length))
    train, _, _ = prepare_dataloaders(config, load_dataset(config))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    sort_by = "self_cuda_time_total" if ON_GPU else "self_cpu_time_total"
    tables = []
    for encoder in args.encoders:
        model = build_model(encoder, config, train.dataset)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        stream = batches(train)
        # warm-up first: one-off work per shape (scan-kernel choice, compilation) stays out of the profile
        for batch in itertools.islice(stream, args.warmup_batches):
            train_step(model, optimizer, batch, args.bf16)
        with profile(activities=activities) as prof:
            start = synchronized_time()
            for batch in itertools.islice(stream, args.profile_steps):
                train_step(model, optimizer, batch, args.bf16)
            seconds = synchronized_time() - start
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70)
        tables.append(f"## {encoder}: {args.profile_steps} training steps at L={args.profile_length}, "
                      f"{config['train_batch_size']} windows, loss {args.loss_type} "
                      f"({seconds / args.profile_steps * 1000:.1f} ms per step under the profiler)\n\n{table}")
        model = optimizer = None
        free_gpu()
    return "\n\n".join(tables) + "\n"


def accuracy_row(args, data_name):
    from recbole_mamba import run

    settings = {**model_settings(args, data_name, args.accuracy_length), "epochs": args.accuracy_epochs,
                "checkpoint_dir": tempfile.mkdtemp()}
    start = time.perf_counter()
    result = run("RecMamba", data_name, config_dict=settings)
    return {
        "data": data_name, "model": "RecMamba", "length": args.accuracy_length, "epochs": args.accuracy_epochs,
        "seconds": time.perf_counter() - start,
        "best_valid": {k: float(v) for k, v in result["best_valid_result"].items()},
        "test": {k: float(v) for k, v in result["test_result"].items()},
    }


def speed_table(rows):
    lines = ["| data | L | model | dtype | windows / batch | CUDA graph | scan | s / epoch | tokens / s | peak GiB (reserved) "
             "| peak GiB (allocated) | timed batches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['length']} | {r['model']} | {r['dtype']} | {r['windows_per_batch']} | | | "
                         f"{r['error']} | | | | |")
            continue
        star = " (extrapolated)" if r["extrapolated"] else ""
        graph = {True: "yes", False: "no"}.get(r.get("cuda_graph"), "")
        allocated = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else ""
        lines.append(f"| {r['data']} | {r['length']} | {r['model']} | {r['dtype']} | {r['windows_per_batch']} | {graph} | "
                     f"{r.get('scan_kernel', '')} | {r['epoch_s']:.2f}{star} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
                     f"{allocated} | {r['timed_batches']} of {r['epoch_batches']} |")
    return "\n".join(lines)


def accuracy_table(rows):
    lines = ["| data | model | L | epochs | valid NDCG@10 | test HR@10 | test NDCG@10 | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['model']} | {r['length']} | {r['epochs']} | {r['best_valid'].get('ndcg@10', float('nan')):.4f} | "
                     f"{r['test'].get('hit@10', float('nan')):.4f} | {r['test'].get('ndcg@10', float('nan')):.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows, data_name, path, loss_type="CE"):
    plt = _report.pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for encoder in ENCODERS:
        points = [r for r in rows if r["model"] == encoder and r["data"] == data_name]
        done = [r for r in points if "error" not in r]
        for ax, key in zip(axes, ("epoch_s", "peak_gib")):
            line = ax.plot([r["length"] for r in done], [r[key] for r in done], "-o", label=encoder)[0]
            for r in points:
                if "error" in r:  # where it ran out of memory
                    ax.axvline(r["length"], color=line.get_color(), linestyle=":", alpha=0.7)
                    ax.annotate("OOM", (r["length"], 1), xycoords=("data", "axes fraction"),
                                color=line.get_color(), ha="center", va="top", fontsize=8)
    _report.against_length(axes, "MAX_ITEM_LIST_LENGTH (same tokens per batch at every length)",
                           ("seconds per training epoch", "peak GPU memory (GiB)"))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data_name} (GENERATED data): all-position {loss_type} loss, width 64" if "generated" in data_name else data_name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def generated_data(args):
    """The generated dataset's name, written under data_path unless it is there already."""
    from recbole_mamba.data.generated import default_name

    name = default_name(args.gen_users, args.gen_mean_length, args.seed)
    if not (Path(args.gen_path) / name / f"{name}.inter").is_file():
        write_lifelong_dataset(args.gen_path, name, users=args.gen_users, items=args.gen_items,
                               mean_length=args.gen_mean_length, seed=args.seed)
    return name


def _true_or_false(text):
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() == "true"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in a temporary folder (CPU smoke test)")
    parser.add_argument("--data_path", help="folder of datasets holding ml-1m")
    parser.add_argument("--gen_path", default="dataset", help="folder the generated data is written to (and read from)")
    parser.add_argument("--parts", default="speed,accuracy", help="comma-separated: speed, accuracy, profile")
    parser.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--encoders", type=lambda s: s.split(","), default=list(ENCODERS),
                        help=f"comma-separated, of: {', '.join(ENCODERS)}")
    parser.add_argument("--max_batches", type=int, help="time at most this many batches per model and length")
    parser.add_argument("--time_limit", type=float, help="stop timing a model and length after this many seconds")
    parser.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (parameters in float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--name", default=NAME, help="results file name (without extension)")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from results/<name>.json")
    for key, value in FULL.items():
        if key != "lengths":
            parser.add_argument(f"--{key}", type=_true_or_false if isinstance(value, bool) else type(value))
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for encoder in args.encoders:
        if encoder not in ENCODERS:
            parser.error(f"unknown encoder {encoder!r}: use {', '.join(ENCODERS)}")
    if args.smoke:
        args.gen_path = tempfile.mkdtemp()
    elif not args.data_path and not args.plot:
        parser.error("--data_path is needed (the folder holding ml-1m)")
    return args


def main(argv=None):
    args = parse_args(argv)
    png = _report.RESULTS / f"{args.name}.png"
    if args.plot:
        results = json.loads((_report.RESULTS / f"{args.name}.json").read_text())["results"]
        plot(results["speed"], results["generated_data"], png, results["settings"].get("loss_type", "CE"))
        return 0
    if not ON_GPU:
        print("no CUDA GPU: the numbers mean nothing (memory reads 0)", flush=True)
    parts = args.parts.split(",")
    env = _report.environment()
    generated = generated_data(args)
    settings = {k: getattr(args, k) for k in (*FULL, "max_batches", "time_limit", "seed", "bf16")}
    results = {"settings": settings, "generated_data": generated, "speed": [], "accuracy": []}

    def write():
        tables = []
        if results["speed"]:
            tables += [f"## Training speed and memory (all-position {args.loss_type} loss, flat storage)", "", speed_table(results["speed"]), ""]
        if results["accuracy"]:
            tables += ["## RecMamba, full-ranking accuracy", "", accuracy_table(results["accuracy"]), ""]
        _report.write(args.name, env, results, "\n".join(tables), notes=(
            f"{generated} is GENERATED data (recbole_mamba.data.generated), not real user behaviour. "
            "Times: torch.cuda.synchronize() around the timed batches, after warm-up batches, data loading "
            "included; an epoch time marked extrapolated is the timed batches' mean x the epoch's batches. "
            "Peak: over the timed batches, parameters and optimizer state included; reserved "
            "(torch.cuda.max_memory_reserved(), after emptying the allocator's cache) counts the memory CUDA graphs "
            "hold, allocated (max_memory_allocated()) does not. CUDA graph: the encoder's training forward and "
            "backward replayed as CUDA graphs (RecMamba's cuda_graph; the attention encoders run eagerly); scan: the selective scan "
            "RecMamba's layers ran (scan_kernel auto picks the faster on the first batch)."))

    accuracy_data = generated if args.smoke else "ml-1m"
    if "profile" in parts:
        path = _report.RESULTS / f"{args.name}_profile.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {env['device']}, {env['date']}, `{env['command']}`\n{generated} is GENERATED data.\n\n"
                        + profile_tables(args, generated))
        print(f"wrote {path}", flush=True)
    if "speed" in parts:
        speed_rows(args, generated, args.lengths, results["speed"], write)
        if args.ml1m_length:
            speed_rows(args, "ml-1m", [args.ml1m_length], results["speed"], write)
        plot(results["speed"], generated, png, args.loss_type)
    if "accuracy" in parts:
        results["accuracy"].append(accuracy_row(args, accuracy_data))
        print(results["accuracy"][-1], flush=True)
    if results["speed"] or results["accuracy"]:  # a profile-only run leaves earlier results alone
        write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
