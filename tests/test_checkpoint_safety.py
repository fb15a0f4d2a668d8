"""Loading a checkpoint never runs code from it, on every path that loads one; the plugin's own
checkpoints still load, and ``trust_checkpoint`` is the one explicit way to unpickle an old file."""

import os
import pickle

import numpy as np
import pytest
import torch
from recbole.config.configurator import Config as RecBoleConfig

import run_recbole_mamba
from recbole_mamba import run
from recbole_mamba.checkpoint import CheckpointError, UnsafeCheckpointError, _called_globals, load_checkpoint
from recbole_mamba.quick_start import load_data_and_model
from tests.conftest import FAST_SETTINGS, TINY_MAMBA


@pytest.fixture(scope="module")
def trained(few_users_ml100k, tmp_path_factory):
    """One short real run: its best-model and '-last.pth' checkpoints, and its settings."""
    data_path, name = few_users_ml100k
    workdir = tmp_path_factory.mktemp("trained")
    settings = {**FAST_SETTINGS, **TINY_MAMBA, "data_path": data_path, "epochs": 1,
                "checkpoint_dir": str(workdir / "saved")}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = run("Mamba4Rec", name, config_dict=settings)
    finally:
        os.chdir(cwd)
    return result, name, settings


class RunsCommand:
    """Unpickling this runs ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsRecBoleConfig:
    """Unpickling this calls ``Config(...)`` with settings from the file: RecBole's configuration code
    runs and, among other things, sets CUDA_VISIBLE_DEVICES in the loading process. Config is on the
    allow-list (every checkpoint holds one), so weights_only alone does not stop this."""

    def __reduce__(self):
        return (RecBoleConfig, ("BPR", "ml-100k", None, {"gpu_id": "from-the-checkpoint"}))


def poisoned_copy(checkpoint_file, tmp_path, payload):
    """The real checkpoint with one more entry whose unpickling runs ``payload``."""
    checkpoint = load_checkpoint(checkpoint_file)
    checkpoint["extra"] = payload
    evil = tmp_path / "evil.pth"
    torch.save(checkpoint, evil)
    return evil


def test_plugin_checkpoints_load_safely(trained):
    result, _, _ = trained
    best = load_checkpoint(result["model_file"])
    last = load_checkpoint(result["last_model_file"])
    assert set(best) >= {"config", "state_dict", "optimizer", "epoch"}
    assert last["epoch"] == 0 and "resume" in last
    for name, tensor in best["state_dict"].items():
        torch.testing.assert_close(tensor, last["state_dict"][name], rtol=0, atol=0)  # one epoch: same model


def test_checkpoint_that_runs_a_command_is_refused_everywhere(trained, tmp_path, capsys, monkeypatch):
    result, name, settings = trained
    marker = tmp_path / "marker"
    evil = poisoned_copy(result["model_file"], tmp_path, RunsCommand(f"touch {marker}"))

    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system") as error:
        load_checkpoint(evil)
    assert "trust_checkpoint=True" in str(error.value)
    with pytest.raises(UnsafeCheckpointError):
        load_data_and_model(evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil)  # RecBole's own torch.load, under the allow-list compat registers

    # The trainers' reload of the best model and their resume, which RecBole does with torch.load:
    # RecBole's own Trainer, and the plugin's resumable one.
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    from recbole_mamba.config import Config
    from recbole_mamba.model import Mamba4Rec
    from recbole_mamba.trainer import get_trainer

    config = Config("Mamba4Rec", name, config_dict={**settings, "checkpoint_dir": str(tmp_path)})
    _, _, test_data = data_preparation(config, create_dataset(config))
    for trainer_class in (Trainer, get_trainer(config)):
        trainer = trainer_class(config, Mamba4Rec(config, test_data._dataset))
        with pytest.raises(UnsafeCheckpointError):
            trainer.evaluate(test_data, load_best_model=True, model_file=str(evil))
        with pytest.raises(UnsafeCheckpointError):
            trainer.resume_checkpoint(evil)

    # The command line, resuming from it: one paragraph, exit 2, nothing written.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cli = [f"--{key}={value}" for key, value in settings.items()]
    status = run_recbole_mamba.main(["--model=Mamba4Rec", f"--dataset={name}", *cli, f"--resume={evil}"])
    err = capsys.readouterr().err
    assert status == 2 and "Refusing to load checkpoint" in err and "Traceback" not in err
    assert list(workdir.iterdir()) == []
    assert not marker.exists()


def test_checkpoint_that_calls_an_allowed_class_is_refused(trained, tmp_path, monkeypatch):
    result, _, _ = trained
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unchanged")
    evil = poisoned_copy(result["model_file"], tmp_path, CallsRecBoleConfig())
    assert "recbole.config.configurator.Config" in _called_globals(_data_pkl(evil))

    with pytest.raises(UnsafeCheckpointError, match=r"calls recbole\.config\.configurator\.Config"):
        load_checkpoint(evil)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "unchanged"

    # The threat is real: torch's weights_only loader alone, with Config allowed, runs it.
    torch.load(evil, weights_only=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "from-the-checkpoint"


def _data_pkl(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def test_genuine_checkpoint_calls_nothing_but_tensor_rebuilders(trained):
    result, _, _ = trained
    called = set(_called_globals(_data_pkl(result["last_model_file"])))
    assert called, "the scan must see the calls that rebuild tensors"
    assert all(name.startswith(("torch.", "collections.", "recbole.utils.enum_type.")) for name in called), called


def test_old_recbole_checkpoint_needs_the_trust_flag(trained, tmp_path):
    result, _, _ = trained
    checkpoint = load_checkpoint(result["model_file"])
    # As RecBole 1.2.1 writes it: pickle protocol 4 and a numpy best score.
    checkpoint["best_valid_score"] = np.float64(checkpoint["best_valid_score"])
    old = tmp_path / "old-recbole.pth"
    torch.save(checkpoint, old, pickle_protocol=4)

    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_data_and_model(old)
    config, model, *_ = load_data_and_model(old, trust_checkpoint=True)
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    result, _, _ = trained
    data = open(result["model_file"], "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(truncated)
