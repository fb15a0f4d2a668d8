"""What every benchmark records beside its numbers: machine, versions, date and the exact command."""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

# Where results go: benchmarks/results, or the folder named by $BENCHMARK_RESULTS (e.g. on a
# machine that only hands back one output folder).
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS") or Path(__file__).resolve().parent / "results")


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision():
    try:
        # "-dirty" when the working tree differs from the commit.
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """A dict describing where and with what the benchmark ran."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(sys.argv),
        "device": gpu or f"CPU: {_cpu_name()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("torch", "numpy", "recbole", "recbole-mamba", "mamba-ssm", "causal-conv1d", "triton",
                      "liger-kernel")},
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_revision": _git_revision(),
    }


def gpu_benchmark_start(doc):
    """(arguments, environment) of a GPU micro-benchmark whose only option is ``--reps``; exits
    with a message where there is no CUDA GPU."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    return args, environment()


def write(name, env, rows, markdown_table, notes=""):
    """Write results/<name>.json and results/<name>.md; return the two paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    header = [
        f"# {name}",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']} (torch threads: {env['torch_threads']})",
        f"- versions: Python {env['python']}, {versions}",
        f"- git revision: {env['git_revision']}",
        f"- command: `{env['command']}`",
        "",
    ]
    md_path.write_text("\n".join(header) + "\n" + markdown_table + "\n" + (f"\n{notes}\n" if notes else ""))
    return json_path, md_path


def pyplot():
    """matplotlib.pyplot drawing to files only, or None (with a hint) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib; then --plot)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def against_length(axes, xlabel, ylabels):
    """Log-log axes of a quantity against sequence length (powers of two)."""
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
