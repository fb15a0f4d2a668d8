"""sequence_storage flat: each user's history once, histories cut per batch; the same splits, batches
and metrics as RecBole's prefix table (its twin), and memory that does not grow with the length."""

import collections

import numpy as np
import pytest
import torch
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_mamba.config import Config
from recbole_mamba.data.dataloader import WindowDataLoader
from recbole_mamba.data.flat_dataset import FlatSequenceDataset, leave_one_out_parts
from recbole_mamba.data.loading import load_dataset, prepare_dataloaders
from recbole_mamba.errors import UserInputError
from recbole_mamba.trainer import Trainer
from tests.conftest import FAST_SETTINGS, TINY_MAMBA

MAX_LEN = 8
BATCH_FIELDS = ("user_id", "item_id", "item_id_list", "item_length")


def build(data, storage, max_len=MAX_LEN, model="Mamba4Rec", **settings):
    data_path, name = data
    config = Config(model, name, config_dict={
        **FAST_SETTINGS, **TINY_MAMBA, "data_path": data_path, "MAX_ITEM_LIST_LENGTH": max_len,
        "sequence_storage": storage, "train_batch_size": 16, "eval_batch_size": 32, **settings})
    init_seed(config["seed"], config["reproducibility"])
    dataset = load_dataset(config)
    return config, dataset, prepare_dataloaders(config, dataset)


@pytest.fixture(scope="module")
def both(tiny_ml100k):
    """{(storage, train_mode): (config, dataset, loaders)} on the same slice."""
    return {(storage, mode): build(tiny_ml100k, storage, train_mode=mode)
            for storage in ("prefix", "flat") for mode in ("prefix", "all_positions")}


def assert_same_batches(loader_a, loader_b):
    batches = 0
    for a, b in zip(loader_a, loader_b, strict=True):
        a, b = (a, b) if isinstance(a, Interaction) else (a[0], b[0])
        for field in BATCH_FIELDS:
            torch.testing.assert_close(a[field], b[field], rtol=0, atol=0, msg=field)
        batches += 1
    assert batches > 0


@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_flat_storage_gives_recboles_batches(both, mode):
    """Training (prefix rows or windows, same shuffling), validation and test: the same batches."""
    prefix_loaders, flat_loaders = both["prefix", mode][2], both["flat", mode][2]
    assert isinstance(both["flat", mode][1], FlatSequenceDataset)
    for prefix_loader, flat_loader in zip(prefix_loaders, flat_loaders):
        assert type(prefix_loader) is type(flat_loader)
        assert len(prefix_loader.dataset) == len(flat_loader.dataset)
        assert_same_batches(prefix_loader, flat_loader)
    # Evaluation batches are RecBole's (interaction, history index, positive users, positive items).
    for phase in (1, 2):
        for a, b in zip(prefix_loaders[phase], flat_loaders[phase], strict=True):
            assert a[1] is None and b[1] is None
            torch.testing.assert_close(a[2:], b[2:], rtol=0, atol=0)


def test_same_model_same_validation_and_test_metrics(both):
    """RecBole's evaluate() on the two storages gives the same numbers, before and after training."""
    results = {}
    for storage in ("prefix", "flat"):
        config, _, (train, valid, test) = both[storage, "all_positions"]
        init_seed(config["seed"], config["reproducibility"])
        model = config.model_class(config, train.dataset)
        trainer = Trainer(config, model)
        before = (trainer.evaluate(valid, load_best_model=False), trainer.evaluate(test, load_best_model=False))
        trainer._train_epoch(train, 0)
        after = (trainer.evaluate(valid, load_best_model=False), trainer.evaluate(test, load_best_model=False))
        results[storage] = before, after, model.state_dict()
    (before_p, after_p, weights_p), (before_f, after_f, weights_f) = results["prefix"], results["flat"]
    assert before_p == before_f and after_p == after_f
    assert before_p != after_p  # training changed the model, so the comparison after it means something
    for key in weights_p:
        torch.testing.assert_close(weights_p[key], weights_f[key], rtol=0, atol=0, msg=key)


def test_windows_from_flat_storage_cover_every_training_interaction_once(both):
    config, dataset, (train, _, _) = both["flat", "all_positions"]
    assert isinstance(train, WindowDataLoader)
    rows = train.dataset.inter_feat
    expected = collections.Counter(zip(rows["user_id"].tolist(), rows["item_id"].tolist()))
    seen = collections.Counter()
    for batch in train:
        targets = batch["item_id"]
        for user, row in zip(batch["user_id"].tolist(), targets):
            seen.update((user, item) for item in row[row > 0].tolist())
    assert seen == expected and sum(seen.values()) == len(rows)


def test_histories_are_the_items_before_each_target():
    """The twin of histories(): a loop over each user's time-ordered list."""
    sequences = {1: [5, 6, 7, 8, 9, 10], 2: [3, 4], 3: [7, 7, 7, 8]}
    flat = FlatSequenceDataset.__new__(FlatSequenceDataset)  # only the stored arrays are needed
    flat.max_item_list_len, flat.item_id_list_field, flat.item_list_length_field = 3, "item_id_list", "item_length"
    flat.sequence_items = torch.tensor([i for u in (1, 2, 3) for i in sequences[u]])
    flat.user_start = np.array([0, 0, 6, 8])
    users, positions = np.array([1, 1, 1, 2, 3, 3]), np.array([1, 3, 5, 7, 9, 11])
    got = flat.histories(positions, users)
    for k, (user, position) in enumerate(zip(users, positions)):
        index = position - flat.user_start[user]
        history = sequences[user][max(0, index - 3) : index]
        assert got["item_id_list"][k].tolist() == history + [0] * (3 - len(history))
        assert got["item_length"][k] == len(history)


@pytest.mark.parametrize("parts", [1, 2])  # valid_only / test_only, valid_and_test
def test_leave_one_out_equals_recboles_loop(parts):
    rng = np.random.default_rng(parts)
    groups = rng.integers(1, 30, size=300)  # interleaved groups of 1 to ~25 rows
    ours = leave_one_out_parts(groups, parts)
    theirs = Dataset._split_index_by_leave_one_out(None, Dataset._grouped_index(None, groups), parts)
    assert [part.tolist() for part in ours] == theirs


def test_data_augmentation_never_runs_and_memory_does_not_grow_with_the_length(few_users_ml100k, monkeypatch):
    """The bytes held by dataset and dataloaders, at MAX_ITEM_LIST_LENGTH 50 and 5000."""
    def refuse(self):
        raise AssertionError("the prefix table was built")

    held = {}
    with monkeypatch.context() as patched:
        patched.setattr(SequentialDataset, "data_augmentation", refuse)
        for max_len in (50, 5000):
            _, dataset, loaders = build(few_users_ml100k, "flat", max_len, train_mode="all_positions")
            held[max_len] = bytes_held([dataset, *loaders])
    # The measurement sees the prefix table: RecBole's storage grows with the length.
    prefix = {max_len: bytes_held([build(few_users_ml100k, "prefix", max_len)[1]]) for max_len in (10, 100)}
    assert prefix[100] > 5 * prefix[10]
    # (Longer windows are fewer, so the windows' own arrays shrink a little.)
    assert held[5000] <= held[50]
    assert held[50] < prefix[10]


def bytes_held(roots):
    """Bytes of every numpy array and torch tensor reachable from ``roots`` (shared storage once)."""
    seen_objects, seen_storage, total = set(), set(), 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            if obj.dtype == object:
                stack.extend(obj.ravel().tolist())
            elif obj.base is None and obj.ctypes.data not in seen_storage:
                seen_storage.add(obj.ctypes.data)
                total += obj.nbytes
            elif obj.base is not None:
                stack.append(obj.base)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("recbole", "recbole_mamba", "pandas"):
            stack.extend(vars(obj).values())
    return total


def test_bad_sequence_storage_values(tiny_ml100k):
    data_path, name = tiny_ml100k
    with pytest.raises(UserInputError, match=r"sequence_storage must be one of prefix, flat, got 'long'"):
        Config("Mamba4Rec", name, config_dict={"data_path": data_path, "sequence_storage": "long"})
    with pytest.raises(UserInputError, match="sequence_storage=flat .* BPR is not one"):
        Config("BPR", name, config_dict={"data_path": data_path, "sequence_storage": "flat"})
    with pytest.raises(UserInputError, match="sequence_storage=flat .*benchmark_filename"):
        Config("SASRec", name, config_dict={"data_path": data_path, "sequence_storage": "flat",
                                            "benchmark_filename": ["train", "valid", "test"]})
