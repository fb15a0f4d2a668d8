"""Shared fixtures: small slices of real data, written to temporary folders."""

import os
from pathlib import Path

import pytest
import recbole

import recbole_mamba  # noqa: F401  (applies the RecBole compatibility fixes)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
EMBEDDED_ML100K = Path(os.path.dirname(recbole.__file__)) / "dataset_example" / "ml-100k"


def write_slice(source_inter, target_folder, name, n_users):
    """Copy the rows of the first ``n_users`` users (in file order) of an .inter file."""
    target = Path(target_folder) / name
    target.mkdir(parents=True)
    users = []
    with open(source_inter, encoding="utf-8") as src, open(target / f"{name}.inter", "w", encoding="utf-8") as dst:
        dst.write(src.readline())
        for line in src:
            user = line.split("\t", 1)[0]
            if user not in users:
                if len(users) == n_users:
                    continue
                users.append(user)
            dst.write(line)
    return target


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """RecBole writes log/, log_tensorboard/ and saved/ into the working directory: not the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_ml100k(tmp_path_factory):
    """(data_path, dataset name): the first 100 users of RecBole's bundled ml-100k."""
    data_path = tmp_path_factory.mktemp("data")
    write_slice(EMBEDDED_ML100K / "ml-100k.inter", data_path, "ml100k-tiny", n_users=100)
    return str(data_path), "ml100k-tiny"


@pytest.fixture(scope="session")
def few_users_ml100k(tmp_path_factory):
    """(data_path, dataset name): the first 40 users of the bundled ml-100k, for tests that train
    several times (about 1/3 s per epoch of TINY_MAMBA)."""
    data_path = tmp_path_factory.mktemp("few")
    write_slice(EMBEDDED_ML100K / "ml-100k.inter", data_path, "ml100k-few", n_users=40)
    return str(data_path), "ml100k-few"


# Settings that keep end-to-end runs on the CPU to seconds.
FAST_SETTINGS = {
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_batch_size": 256,
    "eval_batch_size": 256,
    "show_progress": False,
    "worker": 0,
}


def shared_dataset(name):
    """Path of a dataset in ../shared/datasets, or skip the test with the reason."""
    folder = SHARED_DATASETS / name
    if not (folder / f"{name}.inter").is_file():
        pytest.skip(f"needs {folder}/{name}.inter (the shared datasets folder beside the checkout)")
    return str(SHARED_DATASETS)


# A Mamba4Rec small enough that a subprocess trains a few epochs in seconds.
TINY_MAMBA = {"hidden_size": 16, "d_state": 8, "expand": 1, "mamba_backend": "torch"}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Torch on one thread, here and in subprocesses. On a shared 2-core machine two threads spin-wait
    for each other while other work holds a core, and a small training slows down 20- to 50-fold;
    runs that are compared bit for bit need the same thread count anyway."""
    import torch

    threads, previous = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if previous is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = previous
