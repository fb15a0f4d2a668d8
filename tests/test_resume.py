"""A run killed with SIGKILL resumes from its '-last.pth' checkpoint and ends exactly where an
uninterrupted run with the same seed ends; checkpoints are never left truncated."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from recbole_mamba import run
from recbole_mamba.checkpoint import CheckpointError, load_checkpoint
from recbole_mamba.quick_start import create_config
from recbole_mamba.trainer import ResumableTraining
from tests.conftest import FAST_SETTINGS, REPO, TINY_MAMBA

EPOCHS = 3


def settings(data_path, **extra):
    # Dropout and shuffling stay on: both draw random numbers that a resumed run must reproduce.
    return {**FAST_SETTINGS, **TINY_MAMBA, "data_path": data_path, "epochs": EPOCHS, "learning_rate": 0.01, **extra}


def as_args(data_path, **extra):
    return [f"--{key}={value}" for key, value in settings(data_path, **extra).items()]


def saved_files(folder):
    saved = folder / "saved"
    best = [p for p in saved.glob("*.pth") if not p.name.endswith("-last.pth")]
    last = list(saved.glob("*-last.pth"))
    assert len(best) == 1 and len(last) == 1, list(saved.iterdir())
    return best[0], last[0]


def assert_same_weights(file_a, file_b):
    a, b = load_checkpoint(file_a)["state_dict"], load_checkpoint(file_b)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(few_users_ml100k, tmp_path_factory):
    """(folder, result) of the run never interrupted, in this process (one torch thread, as the
    subprocess below: see tests/conftest.py)."""
    data_path, name = few_users_ml100k
    workdir = tmp_path_factory.mktemp("uninterrupted")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = run("Mamba4Rec", name, config_dict=settings(data_path))
    finally:
        os.chdir(cwd)
    return workdir, result


def test_killed_run_resumes_to_the_same_result(uninterrupted, few_users_ml100k, tmp_path, monkeypatch):
    data_path, name = few_users_ml100k
    reference_dir, reference = uninterrupted

    # The same run through the command line, SIGKILLed as soon as its first epoch is saved.
    command = [sys.executable, str(REPO / "run_recbole_mamba.py"), "--model=Mamba4Rec", f"--dataset={name}"]
    process = subprocess.Popen(
        [*command, *as_args(data_path)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "Saved resumable state of epoch 0" in line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    best, last = saved_files(tmp_path)
    assert load_checkpoint(last)["epoch"] < EPOCHS - 1, "the run must be killed before it ends"

    # Resumed with the command line's settings plus --resume (what run_recbole_mamba.py passes on).
    monkeypatch.chdir(tmp_path)
    resumed = run("Mamba4Rec", name, cmd_args=as_args(data_path, resume=f"saved/{last.name}"))
    assert os.path.samefile(resumed["model_file"], best) and os.path.samefile(resumed["last_model_file"], last)
    assert dict(resumed["best_valid_result"]) == dict(reference["best_valid_result"])
    assert dict(resumed["test_result"]) == dict(reference["test_result"])
    reference_best, reference_last = saved_files(reference_dir)
    assert_same_weights(best, reference_best)
    assert_same_weights(last, reference_last)
    assert load_checkpoint(last)["epoch"] == EPOCHS - 1


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_best_model(uninterrupted, few_users_ml100k, monkeypatch):
    data_path, name = few_users_ml100k
    workdir, reference = uninterrupted
    best, last = saved_files(workdir)
    best_bytes = best.read_bytes()
    monkeypatch.chdir(workdir)
    result = run("Mamba4Rec", name, config_dict={**settings(data_path), "resume": str(last)})
    assert os.path.samefile(result["model_file"], best)
    assert best.read_bytes() == best_bytes
    assert dict(result["test_result"]) == dict(reference["test_result"])


def test_without_the_random_states_a_resumed_run_diverges(uninterrupted, few_users_ml100k, tmp_path, monkeypatch):
    # The control for the test above: the same resume after epoch 0, but with the random and
    # shuffling states left as a fresh run has them, does not reproduce the uninterrupted run.
    data_path, name = few_users_ml100k
    _, reference_last = saved_files(uninterrupted[0])
    monkeypatch.chdir(tmp_path)
    first = run("Mamba4Rec", name, config_dict={**settings(data_path), "epochs": 1})
    monkeypatch.setattr(ResumableTraining, "_restore_states", lambda self, resume: None)
    resumed = run("Mamba4Rec", name, config_dict={**settings(data_path), "resume": first["last_model_file"]})
    with pytest.raises(AssertionError):
        assert_same_weights(resumed["last_model_file"], reference_last)


def test_resume_needs_a_last_checkpoint_of_the_same_model_and_dataset(uninterrupted, few_users_ml100k):
    data_path, name = few_users_ml100k
    workdir, _ = uninterrupted
    best, last = saved_files(workdir)
    with pytest.raises(CheckpointError, match="best-model checkpoint.*-last.pth"):
        create_config("Mamba4Rec", name, config_dict={**settings(data_path), "resume": str(best)})
    with pytest.raises(CheckpointError, match="does not exist"):
        create_config("Mamba4Rec", name, config_dict={**settings(data_path), "resume": str(workdir / "nope.pth")})
    with pytest.raises(ValueError, match="model 'Mamba4Rec', not 'SASRec'.*--model=Mamba4Rec"):
        create_config("SASRec", name, config_dict={**FAST_SETTINGS, "data_path": data_path, "resume": str(last)})


SAVE_FOREVER = """
import importlib.util, sys, torch
# compat.py alone (it needs only torch and numpy): the process starts without importing RecBole.
spec = importlib.util.spec_from_file_location("compat", "recbole_mamba/compat.py")
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
save_atomically = compat.save_atomically
path = sys.argv[1]
step = 0
while True:
    step += 1
    save_atomically({"step": step, "weights": torch.full((2_000_000,), float(step))}, path)
    print(step, flush=True)
"""


def test_kill_while_saving_leaves_the_previous_complete_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    rng = random.Random(0)
    for _ in range(2):
        process = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        try:
            started = time.monotonic()
            assert process.stdout.readline()  # one complete save
            process.stdout.readline()  # and another: now the time of one save is known
            one_save = (time.monotonic() - started) / 2
            time.sleep(rng.uniform(0, one_save))  # somewhere inside the next save
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=60)
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["weights"].shape == (2_000_000,)
        assert bool((checkpoint["weights"] == checkpoint["step"]).all())
    names = [p.name for p in tmp_path.iterdir()]
    # A kill mid-save can leave its hidden temporary file, never the checkpoint's own name half-written.
    assert all(name == "model.pth" or name.startswith(".tmp-") for name in names), names
