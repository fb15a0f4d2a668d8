"""End to end through the CLI: Mamba4Rec and RecBole's SASRec on a slice of real ml-100k data."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import run_recbole_mamba
from recbole_mamba import load_data_and_model, run
from recbole_mamba.checkpoint import load_checkpoint
from recbole_mamba.data.dataloader import WindowDataLoader
from recbole_mamba.nn import losses
from recbole_mamba.quick_start import create_config
from tests.conftest import EMBEDDED_ML100K, FAST_SETTINGS, REPO


def test_no_arguments_selects_the_embedded_default():
    args, settings = run_recbole_mamba.parse_args([])
    assert (args.model, args.dataset) == ("Mamba4Rec", "ml-100k")
    config = create_config(args.model, args.dataset, cmd_args=settings)
    # The copy inside the recbole package: works on a new machine without a download.
    assert os.path.realpath(config["data_path"]) == os.path.realpath(EMBEDDED_ML100K)
    assert config["train_mode"] == "all_positions" and config["epochs"] == 10 and config["train_batch_size"] == 64
    assert config["MAX_ITEM_LIST_LENGTH"] == 50  # the ml-100k preset


def test_embedded_default_settings_yield_to_the_command_line():
    args, settings = run_recbole_mamba.parse_args(["--epochs=3"])
    assert args.model == "Mamba4Rec" and "--epochs=3" in settings and "--epochs=10" not in settings
    assert "--train_mode=all_positions" in settings
    # Naming a model, a dataset or config files turns the embedded default off.
    args, settings = run_recbole_mamba.parse_args(["--model=SASRec", "--dataset=ml-1m"])
    assert (args.model, args.dataset, settings) == ("SASRec", "ml-1m", [])
    args, settings = run_recbole_mamba.parse_args(["--config_files=my.yaml"])
    assert (args.model, args.dataset, settings) == (None, None, [])


def run_cli(args, cwd):
    result = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_mamba.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def results_table(output):
    """{metric: (valid, test)} from the table the run prints last."""
    rows = re.findall(r"^(\w+@\d+)\s+([\d.naninf]+)\s+([\d.naninf]+)\s*$", output, flags=re.M)
    return {metric: (float(valid), float(test)) for metric, valid, test in rows}


def cli_settings(data_path, **extra):
    settings = {**FAST_SETTINGS, "data_path": data_path, "epochs": 3, "learning_rate": 0.005, **extra}
    return [f"--{key}={value}" for key, value in settings.items()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, train_mode",
    [("Mamba4Rec", "prefix"), ("SASRec", "prefix"), ("Mamba4Rec", "all_positions"), ("SASRecAllPositions", "all_positions")],
)
def test_cli_trains_and_beats_random_ranking(model, train_mode, tiny_ml100k, tmp_path):
    data_path, name = tiny_ml100k
    # A batch of 256 windows is the whole slice: one step per epoch. SASRec's dropout (0.5) needs
    # more steps than 3 to learn; 16 windows a batch gives it about 20 per epoch.
    extra = {"train_batch_size": 16} if model == "SASRecAllPositions" else {}
    settings = cli_settings(data_path, train_mode=train_mode, **extra)
    output = run_cli([f"--model={model}", f"--dataset={name}", *settings], cwd=tmp_path)
    table = results_table(output)
    assert set(table) == {"hit@10", "ndcg@10", "mrr@10"}, output[-2000:]
    assert all(math.isfinite(v) for pair in table.values() for v in pair)

    n_items = int(re.search(r"The number of items: (\d+)", output).group(1))
    # A random ranking of all real items (n_items counts the padding id) puts the target in the
    # top 10 with probability 10 / (n_items - 1). Full ranking masks each user's history, which
    # raises that by about 10% on this slice (~100 of ~900 items): far inside the factor of 3.
    random_hit = 10 / (n_items - 1)
    assert table["hit@10"][1] > 3 * random_hit, (table, n_items)
    assert "epoch 2 training" in output
    if model == "Mamba4Rec":  # the log names the backend: the fused kernels only on a GPU
        expected = "Mamba backend: cuda" if torch.cuda.is_available() else "Mamba backend: torch"
        assert expected in output
    assert "Trainable parameters" in output
    # all_positions trains on windows: the log says how many, and that they hold every target.
    # Without window_stride the windows do not overlap: every input token's next item is a target.
    windows = re.search(r"all_positions: ([\d,]+) windows of up to 10 items, window_stride 10: ([\d,]+) input "
                        r"tokens for ([\d,]+) targets per epoch \(training interactions: ([\d,]+)\)", output)
    assert (windows is not None) == (train_mode == "all_positions")
    if windows:
        assert windows.group(2) == windows.group(3) == windows.group(4)
        # the log names the CE implementation: Liger's kernel only on a GPU where it is installed
        device = "cuda" if torch.cuda.is_available() else "cpu"
        assert f"CE kernel: {'torch' if losses.liger_cross_entropy_missing(device) else 'liger'}" in output


@pytest.mark.slow
def test_python_api_runs_and_reports(tiny_ml100k, tmp_path):
    data_path, name = tiny_ml100k
    result = run("Mamba4Rec", name, config_dict={**FAST_SETTINGS, "data_path": data_path, "epochs": 1})
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert result["trainable_parameters"] > 0
    assert (tmp_path / "saved").is_dir() and result["model_file"].endswith(".pth")


@pytest.mark.slow
def test_checkpoint_reloads_with_its_training_dataloader(tiny_ml100k, tmp_path):
    data_path, name = tiny_ml100k
    settings = {**FAST_SETTINGS, "data_path": data_path, "epochs": 1, "train_mode": "all_positions"}
    result = run("Mamba4Rec", name, config_dict=settings)
    config, model, _, train_data, _, test_data = load_data_and_model(result["model_file"])
    assert config["train_mode"] == "all_positions" and isinstance(train_data, WindowDataLoader)

    # A checkpoint written before train_mode and the sampled-loss keys existed loads with their defaults.
    checkpoint = load_checkpoint(result["model_file"])
    for key in ("train_mode", "negative_sampling", "num_negatives", "logq_correction", "ce_chunk_size"):
        del checkpoint["config"].final_config_dict[key]
    old_file = str(tmp_path / "old.pth")
    torch.save(checkpoint, old_file)
    config, old_model, _, train_data, _, _ = load_data_and_model(old_file)
    assert config["train_mode"] == "prefix" and not isinstance(train_data, WindowDataLoader)
    batch = next(iter(test_data))[0]
    model.eval()
    old_model.eval()
    torch.testing.assert_close(old_model.full_sort_predict(batch), model.full_sort_predict(batch))
