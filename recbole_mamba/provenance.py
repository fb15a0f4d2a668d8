"""What a run's result depends on besides its settings: versions, code revision, device, seed.

``run()`` logs this at the start of every run, so that a published number can be traced back to the
code and packages that produced it and rerun from its seed. (RecBole logs the settings themselves,
and Mamba4Rec logs the Mamba backend it chose.)
"""

import importlib.metadata
import os
import platform
import subprocess

import torch

PACKAGES = ("recbole-mamba", "recbole", "torch", "numpy", "pandas", "mamba-ssm", "causal-conv1d")


def package_versions():
    """{package: version} for the packages a result depends on; 'not installed' where absent."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_revision(folder=None):
    """The commit of the git checkout holding ``folder`` (the plugin's source by default), with
    '+modified' if files differ from it; 'unknown' outside a git checkout (e.g. a wheel install)."""
    folder = folder or os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision + ("+modified" if modified else "")


def describe_run(config):
    """One log line: seed, determinism, device, torch threads, code revision and package versions."""
    device = torch.device(config["device"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        device_text = f"{device} ({name}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    else:
        device_text = f"cpu (torch threads: {torch.get_num_threads()})"
    versions = ", ".join(f"{package} {version}" for package, version in package_versions().items())
    return (
        f"Run provenance: seed {config['seed']}, reproducibility {config['reproducibility']}, "
        f"device {device_text}, recbole-mamba git revision {git_revision()}; versions: {versions}."
    )
