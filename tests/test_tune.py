"""Ray Tune search: the search-space file, input checks, GPU assignment, and one real search.

The end-to-end test runs a 3-trial ASHA search through the CLI on a tiny ml-100k slice (one trial
is meant to fail), then re-runs the best configuration it saved through the CLI.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config
from recbole_mamba.search_space import load_search_space, to_tune
from recbole_mamba.trainer import LAST_SUFFIX
from tests.conftest import EMBEDDED_ML100K, REPO, write_slice

for needed in ("ray.tune", "pyarrow.fs"):
    pytest.importorskip(needed, reason="needs the tune extra: pip install -e '.[test,tune]'")

from recbole_mamba import tune as search_module  # noqa: E402  (after the skip: imports ray lazily)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# The search-space file ------------------------------------------------------------------------------


def test_every_distribution_becomes_the_tune_domain_it_names(tmp_path):
    space = load_search_space(write(tmp_path / "s.yaml", (
        "learning_rate: {loguniform: [1e-4, 1.0e-2]}\n"   # 1e-4 without a dot: still a float
        "dropout_prob: {uniform: [0.1, 0.5]}\n"
        "num_layers: {choice: [1, 2]}\n"
        "hidden_size: {randint: [2, 4]}\n"
        "d_state: {grid: [8, 16]}\n"
    )))
    domains = to_tune(space)
    lr = domains["learning_rate"].sample(size=2000, random_state=0)
    assert 1e-4 <= min(lr) and max(lr) <= 1e-2
    # log-uniform: about half the samples below the geometric midpoint 1e-3
    assert 0.45 < sum(v < 1e-3 for v in lr) / len(lr) < 0.55
    dropout = domains["dropout_prob"].sample(size=2000, random_state=0)
    assert 0.1 <= min(dropout) and max(dropout) <= 0.5 and 0.45 < sum(v < 0.3 for v in dropout) / 2000 < 0.55
    assert set(domains["num_layers"].sample(size=200, random_state=0)) == {1, 2}
    assert set(domains["hidden_size"].sample(size=200, random_state=0)) == {2, 3, 4}  # both ends included
    assert domains["d_state"] == {"grid_search": [8, 16]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: 0.01\n", "expected one distribution"),
        ("learning_rate: {normal: [0, 1]}\n", "expected one distribution"),
        ("learning_rate: {uniform: [0.5, 0.1]}\n", "low < high"),
        ("learning_rate: {loguniform: [0, 0.1]}\n", "0 < low < high"),
        ("learning_rate: {uniform: [0.1]}\n", "two numbers"),
        ("num_layers: {randint: [1, 2.5]}\n", "two integers"),
        ("num_layers: {choice: []}\n", "non-empty list"),
        ("data_path: {choice: [a, b]}\n", "cannot be searched"),
        ("", "is empty"),
        ("- a list\n", "YAML mapping"),
    ],
)
def test_bad_search_space_names_file_key_and_what_is_valid(tmp_path, text, message):
    path = write(tmp_path / "space.yaml", text)
    with pytest.raises(UserInputError, match=re.escape(message)) as error:
        load_search_space(path)
    assert path in str(error.value)


# Checks before anything runs -------------------------------------------------------------------------


@pytest.fixture
def small_data(tmp_path):
    """A relative data_path ('data', from the test's working directory) with 40 ml-100k users."""
    write_slice(EMBEDDED_ML100K / "ml-100k.inter", tmp_path / "data", "ml100k-tune", n_users=40)
    return "data", "ml100k-tune"


@pytest.mark.parametrize(
    "space, settings, message",
    [
        ("dropout_rate: {uniform: [0.1, 0.5]}\n", [], "Close matches: dropout_prob"),
        ("dropout_prob: {uniform: [0.1, 0.5]}\n", ["--dropout_prob=0.2"], "both searched and fixed"),
        ("epochs: {choice: [1, 2]}\n", [], "'epochs' cannot be searched"),
        ("dropout_prob: {uniform: [0.1, 0.5]}\n", ["--num_samples=0"], "--num_samples must be >= 1"),
        ("dropout_prob: {uniform: [0.1, 0.5]}\n", ["--grace_period=5", "--epochs=2"], "exceeds the validations"),
    ],
)
def test_bad_search_is_refused_before_anything_is_written(small_data, tmp_path, space, settings, message):
    data_path, name = small_data
    space_file = write(tmp_path / "space.yaml", space)
    argv = ["--model=Mamba4Rec", f"--dataset={name}", f"--data_path={data_path}", f"--tune={space_file}",
            "--storage_path=runs", *settings]
    with pytest.raises(UserInputError, match=re.escape(message)):
        search_module.main(*_split(argv))
    assert not (tmp_path / "runs").exists()


def _split(argv):
    import run_recbole_mamba

    args, settings = run_recbole_mamba.parse_args(argv)
    return args.model, args.dataset, None, args.tune, settings


def test_a_folder_holding_another_search_is_not_resumed_with_other_settings(small_data, tmp_path):
    data_path, name = small_data
    first = write(tmp_path / "a.yaml", "dropout_prob: {uniform: [0.1, 0.5]}\n")
    second = write(tmp_path / "b.yaml", "dropout_prob: {uniform: [0.1, 0.4]}\n")
    base = create_config("Mamba4Rec", name, config_dict={"data_path": data_path})
    options = search_module.SearchOptions()
    request = search_module._trial_request(base, options)
    folder = str(tmp_path / "runs" / "x")
    search_module._record_request(folder, base, load_search_space(first), request, options)
    search_module._record_request(folder, base, load_search_space(first), request, options)  # same: fine
    with pytest.raises(UserInputError, match="search_space differ"):
        search_module._record_request(folder, base, load_search_space(second), request, options)


def test_unavailable_search_algorithm_says_what_to_install(small_data, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "optuna" else real_find_spec(n, *a))
    data_path, name = small_data
    space_file = write(tmp_path / "space.yaml", "dropout_prob: {uniform: [0.1, 0.5]}\n")
    with pytest.raises(UserInputError, match="pip install optuna"):
        search_module.search("Mamba4Rec", name, space_file, cmd_args=[f"--data_path={data_path}"],
                             options=search_module.SearchOptions(search_alg="optuna"))


def test_the_best_model_checkpoint_is_told_from_other_files_beside_it(tmp_path):
    saved = tmp_path / "trial" / "saved"
    saved.mkdir(parents=True)
    for name in ("Mamba4Rec-Nov-22-2026_16-25-33-last.pth", ".tmp-x1y2.pth", "Mamba4Rec-Nov-22-2026_16-25-33.pth"):
        (saved / name).write_bytes(b"")
    assert search_module._checkpoint(str(tmp_path / "trial")) == str(saved / "Mamba4Rec-Nov-22-2026_16-25-33.pth")
    assert search_module._checkpoint(str(tmp_path / "no-such-trial")) == ""


def test_trials_use_the_gpus_ray_assigned(small_data, monkeypatch):
    """RecBole's Config sets CUDA_VISIBLE_DEVICES from gpu_id: a trial passes Ray's assignment."""
    import ray

    data_path, name = small_data
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [2, 3])
    gpu_id = search_module.assigned_gpu_id()
    assert gpu_id == "2,3"
    create_config("Mamba4Rec", name, config_dict={"data_path": data_path, "gpu_id": gpu_id})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    # A trial without GPUs sees none, and runs on the CPU.
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    config = create_config("Mamba4Rec", name, config_dict={"data_path": data_path, "gpu_id": search_module.assigned_gpu_id()})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and config["device"].type == "cpu"


# One real search -------------------------------------------------------------------------------------


def run_cli(args, cwd, **env):
    result = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_mamba.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_asha_search_records_every_trial_and_its_best_config_reruns(small_data, tmp_path):
    data_path, name = small_data
    # A grid of three dropout values, one of them invalid: three trials, one of which raises.
    space_file = write(tmp_path / "space.yaml", (
        "learning_rate: {loguniform: [5.0e-3, 2.0e-2]}\n"
        "dropout_prob: {grid: [0.1, 0.3, 1.5]}\n"
    ))
    settings = ["--epochs=2", "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=32", "--d_state=8",
                "--train_batch_size=256", "--eval_batch_size=256", "--worker=0"]
    output = run_cli([
        "--model=Mamba4Rec", f"--dataset={name}", f"--data_path={data_path}", f"--tune={space_file}",
        "--num_samples=1", "--scheduler=asha", "--cpus_per_trial=1", "--storage_path=runs", "--name=s",
        *settings,
    ], cwd=tmp_path)
    experiment = tmp_path / "runs" / "s"
    with open(experiment / "trials.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    # Every trial is recorded; the failing one as failed, with its error, without stopping the others.
    assert len(rows) == 3
    by_dropout = {float(row["dropout_prob"]): row for row in rows}
    assert set(by_dropout) == {0.1, 0.3, 1.5}
    failed = by_dropout[1.5]
    assert failed["status"] == "failed" and "dropout_prob must be a number in [0, 1)" in failed["error"]
    trained = [by_dropout[0.1], by_dropout[0.3]]
    assert {row["status"] for row in trained} <= {"completed", "stopped early"}
    assert "completed" in {row["status"] for row in trained}  # ASHA never stops the leader

    for row in trained:
        trial_dir = experiment / row["trial"]
        # One report per epoch, so ASHA could act after each: the history holds epochs 1..n.
        with open(trial_dir / "progress.csv", encoding="utf-8") as f:
            history = list(csv.DictReader(f))
        assert [int(h["epoch"]) for h in history] == list(range(1, int(row["epochs"]) + 1))
        assert float(row["best_valid_ndcg@10"]) == max(float(h["valid_ndcg@10"]) for h in history)
        assert 1 <= int(row["epochs"]) <= 2 and (row["status"] == "completed") == (int(row["epochs"]) == 2)
        # Each trial's log and checkpoint in its own folder, none in the working directory.
        (log,) = (trial_dir / "log" / "Mamba4Rec").glob("*.log")
        assert "epoch 0 evaluating" in log.read_text() and "test result" not in log.read_text()  # test unseen
        # The best model's checkpoint, beside the resumable '<run>-last.pth' every run keeps.
        best_models = [p for p in (trial_dir / "saved").glob("*.pth") if not p.name.endswith(LAST_SUFFIX)]
        assert [Path(row["checkpoint"])] == best_models
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs", "space.yaml"]
    # Tune's saved state marks the search as ended; asked for more trials, it would be unfinished
    # (the same command then resumes it instead of reporting a best trial).
    assert not search_module._interrupted(str(experiment), expected_trials=3)
    assert search_module._interrupted(str(experiment), expected_trials=4)

    # The best trial is the best on validation; its test metrics were computed after the search.
    result = yaml.safe_load((experiment / "best_result.yaml").read_text())
    best = next(row for row in trained if row["trial"] == result["trial"])
    assert float(best["best_valid_ndcg@10"]) == max(float(row["best_valid_ndcg@10"]) for row in trained)
    assert result["valid"]["ndcg@10"] == pytest.approx(float(best["best_valid_ndcg@10"]), abs=1e-4)
    assert set(result["test"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert f"Best trial: {best['trial']}" in output

    best_config = yaml.load((experiment / "best_config.yaml").read_text(), Loader=yaml.FullLoader)
    assert best_config["dropout_prob"] == float(best["dropout_prob"])
    assert best_config["learning_rate"] == pytest.approx(float(best["learning_rate"]), rel=1e-12)
    assert os.path.isabs(best_config["data_path"]) and best_config["hidden_size"] == 32

    # The best configuration re-runs through the CLI as it is, from anywhere, and trains the same
    # model (one thread, as in the trial: RecBole's seeding makes CPU training repeatable).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rerun = run_cli([f"--config_files={experiment / 'best_config.yaml'}", "--show_progress=False"],
                    cwd=elsewhere, OMP_NUM_THREADS="1")
    valid = float(re.search(r"^ndcg@10\s+([\d.]+)\s+[\d.]+\s*$", rerun, flags=re.M).group(1))
    assert valid == pytest.approx(float(best["best_valid_ndcg@10"]), abs=1e-4), rerun[-2000:]
