"""Bad input: one clear paragraph, exit status 2, no traceback, and nothing written to disk."""

import subprocess
import sys

import pytest

import run_recbole_mamba
from tests.conftest import REPO


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def fail_with_message(argv, capsys, workdir):
    status = run_recbole_mamba.main(argv)
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert list(workdir.iterdir()) == [], "bad input must not write logs, checkpoints or data"
    return err


def test_unknown_model_lists_close_matches(empty_cwd, capsys):
    err = fail_with_message(["--model=Mamba4Recc", "--dataset=ml-100k"], capsys, empty_cwd)
    assert "Unknown model 'Mamba4Recc'" in err and "Mamba4Rec" in err
    err = fail_with_message(["--model=SASrek", "--dataset=ml-100k"], capsys, empty_cwd)
    assert "SASRec" in err


def test_model_names_are_case_insensitive():
    from recbole_mamba.config import get_model

    assert get_model("mamba4rec").__name__ == "Mamba4Rec"
    assert get_model("sasrec").__name__ == "SASRec"


def test_missing_dataset_that_cannot_be_downloaded(empty_cwd, capsys, tmp_path):
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=no-such-data", f"--data_path={tmp_path}"], capsys, empty_cwd)
    assert "no-such-data" in err and str(tmp_path / "no-such-data") in err and "--data_path" in err


def test_dataset_folder_without_inter_file(empty_cwd, capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mine.item").write_text("item_id:token\n1\n")
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=mine", f"--data_path={tmp_path}"], capsys, empty_cwd)
    assert "no mine.inter" in err and "mine.item" in err


def test_dataset_without_the_fields_the_run_needs(empty_cwd, capsys, tmp_path):
    (tmp_path / "notime").mkdir()
    (tmp_path / "notime" / "notime.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=notime", f"--data_path={tmp_path}"], capsys, empty_cwd)
    assert "notime.inter" in err and "timestamp" in err and "user_id, item_id" in err


def test_header_without_types(empty_cwd, capsys, tmp_path):
    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped" / "untyped.inter").write_text("user_id\titem_id\ttimestamp\n1\t2\t3\n")
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=untyped", f"--data_path={tmp_path}"], capsys, empty_cwd)
    assert "line 1" in err and "name:type" in err


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("--hidden_size=0", "hidden_size must be an integer >= 1, got 0"),
        ("--d_state=0", "d_state must be an integer >= 1, got 0"),
        ("--num_layers=-1", "num_layers must be an integer >= 1, got -1"),
        ("--hidden_size=1.5", "hidden_size must be an integer >= 1, got 1.5"),
        ("--dropout_prob=1.0", "dropout_prob must be a number in [0, 1), got 1.0"),
        ("--dropout_prob=-0.1", "dropout_prob must be a number in [0, 1), got -0.1"),
        ("--MAX_ITEM_LIST_LENGTH=1", "MAX_ITEM_LIST_LENGTH must be an integer >= 2"),
        ("--loss_type=MSE", "loss_type must be one of CE, BPR, BCE, SampledSoftmax, got 'MSE'"),
        ("--train_mode=windows", "train_mode must be one of prefix, all_positions, got 'windows'"),
        ("--negative_sampling=popularity", "negative_sampling must be one of uniform, in_batch"),
        ("--num_negatives=0", "num_negatives must be empty (the loss's default) or an integer >= 1, got 0"),
        ("--ce_chunk_size=0", "ce_chunk_size must be an integer >= 1, got 0"),
        ("--logq_correction=yes", "logq_correction must be true or false, got 'yes'"),
        ("--mamba_backend=triton", "mamba_backend must be one of auto, cuda, torch"),
        ("--mamba_backend=cuda", "mamba_backend=cuda needs a CUDA GPU"),
        ("--scan_kernel=cuda", "scan_kernel must be one of auto, mamba_ssm, triton, got 'cuda'"),
        ("--epochs", "settings are given as --key=value"),
    ],
)
def test_invalid_hyperparameters(setting, expected, empty_cwd, capsys):
    if setting == "--mamba_backend=cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=ml-100k", setting], capsys, empty_cwd)
    assert expected in err


def test_all_positions_only_for_models_that_support_it(empty_cwd, capsys):
    err = fail_with_message(["--model=SASRec", "--dataset=ml-100k", "--train_mode=all_positions"], capsys, empty_cwd)
    assert "train_mode=all_positions" in err and "SASRec does not support it" in err
    assert "models that do: Mamba4Rec" in err


def test_all_positions_refuses_recboles_negative_sampling(empty_cwd, capsys):
    negatives = "--train_neg_sample_args={'distribution': 'uniform', 'sample_num': 1}"
    args = ["--model=Mamba4Rec", "--dataset=ml-100k", "--loss_type=BPR", "--train_mode=all_positions", negatives]
    err = fail_with_message(args, capsys, empty_cwd)
    assert "draws negatives inside the model" in err and "remove train_neg_sample_args" in err
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=ml-100k", "--loss_type=BCE", negatives], capsys, empty_cwd)
    assert "loss_type BCE draws its negatives inside the model" in err


@pytest.mark.parametrize("stride, shown", [("0", "0"), ("51", "51"), ("2.5", "2.5"), ("half", "'half'")])
def test_window_stride_outside_1_to_max_len(stride, shown, empty_cwd, capsys):
    args = ["--model=Mamba4Rec", "--dataset=ml-100k", "--train_mode=all_positions", f"--window_stride={stride}"]
    err = fail_with_message(args, capsys, empty_cwd)
    assert "window_stride must be empty" in err and "1..MAX_ITEM_LIST_LENGTH (1..50)" in err
    assert f"got {shown}." in err


def test_window_stride_only_with_all_positions(empty_cwd, capsys):
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=ml-100k", "--window_stride=3"], capsys, empty_cwd)
    assert "window_stride (got 3)" in err and "train_mode=prefix has no windows" in err


def test_missing_config_file(empty_cwd, capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=ml-100k", f"--config_files={missing}"], capsys, empty_cwd)
    assert f"Cannot read config file '{missing}'" in err


@pytest.mark.parametrize(
    "content, expected",
    [("hidden_size: [64\n", "is not valid YAML"), ("- 1\n- 2\n", "must hold 'key: value' lines"), (b"\xff\xfe", "not UTF-8")],
)
def test_unreadable_config_file(content, expected, empty_cwd, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = fail_with_message(["--model=Mamba4Rec", "--dataset=ml-100k", f"--config_files={bad}"], capsys, empty_cwd)
    assert str(bad) in err and expected in err


def test_cli_process_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_mamba.py"), "--model=NoSuchModel", "--dataset=ml-100k"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Unknown model 'NoSuchModel'" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
