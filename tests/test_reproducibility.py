"""Same seed, data and settings on the CPU: bit-identical results; the log says what produced them."""

import subprocess

import pytest
import torch

from recbole_mamba import run
from recbole_mamba.checkpoint import load_checkpoint
from recbole_mamba.provenance import git_revision, package_versions
from tests.conftest import FAST_SETTINGS, REPO, TINY_MAMBA


def train(few_users_ml100k, folder, **extra):
    data_path, name = few_users_ml100k
    settings = {**FAST_SETTINGS, **TINY_MAMBA, "data_path": data_path, "epochs": 1, "learning_rate": 0.01,
                "checkpoint_dir": str(folder), **extra}
    return run("Mamba4Rec", name, config_dict=settings)


def weights(result):
    return load_checkpoint(result["model_file"])["state_dict"]


def test_same_seed_gives_bit_identical_results(few_users_ml100k, tmp_path):
    first = train(few_users_ml100k, tmp_path / "first")
    second = train(few_users_ml100k, tmp_path / "second")
    assert dict(first["best_valid_result"]) == dict(second["best_valid_result"])
    assert dict(first["test_result"]) == dict(second["test_result"])
    a, b = weights(first), weights(second)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)

    # The control: another seed trains another model.
    other = weights(train(few_users_ml100k, tmp_path / "other", seed=7))
    assert any(not torch.equal(a[name], other[name]) for name in a)


def test_log_records_seed_backend_versions_and_revision(few_users_ml100k, tmp_path):
    train(few_users_ml100k, tmp_path / "saved", epochs=1, seed=123)
    logs = list((tmp_path / "log" / "Mamba4Rec").glob("*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "Run provenance: seed 123, reproducibility True, device cpu" in log
    assert "Mamba backend: torch" in log
    for package in ("torch", "recbole", "numpy", "pandas", "recbole-mamba"):
        assert f"{package} {package_versions()[package]}" in log, package
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_revision().startswith(head)
    assert f"git revision {head}" in log


def test_git_revision_outside_a_checkout(tmp_path):
    assert git_revision(str(tmp_path)) == "unknown"
