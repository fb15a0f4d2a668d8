"""Training windows of train_mode all_positions: rebuilt sequences, window cuts, batches, and the
dataloaders on real data (every training interaction exactly once per epoch; evaluation unchanged)."""

import collections

import numpy as np
import pytest
import torch
from recbole.data import create_dataset
from recbole.data import data_preparation as recbole_data_preparation

from recbole_mamba.config import Config
from recbole_mamba.data import data_preparation
from recbole_mamba.data.dataloader import WindowDataLoader
from recbole_mamba.data.windows import TrainingWindows, cut_windows, user_sequences
from tests.conftest import FAST_SETTINGS


def augmented_rows(sequences, max_len, first_target=1):
    """RecBole's augmentation, as a loop: one row per target from index ``first_target`` on."""
    rows = []
    for user, seq in sequences.items():
        for i in range(first_target, len(seq)):
            history = seq[max(0, i - max_len) : i]
            rows.append((user, history + [0] * (max_len - len(history)), len(history), seq[i]))
    return rows


def as_arrays(rows):
    users, histories, lengths, targets = zip(*rows)
    return np.array(users), np.array(histories), np.array(lengths), np.array(targets)


def random_sequences(rng, n_users=7, max_items=30):
    lengths = rng.integers(2, 25, size=n_users)
    return {int(u): rng.integers(1, max_items, size=n).tolist() for u, n in zip(rng.permutation(100)[:n_users], lengths)}


@pytest.mark.parametrize("first_target", [1, 3])
def test_user_sequences_rebuild_each_users_sequence(first_target):
    rng = np.random.default_rng(0)
    sequences = random_sequences(rng)
    max_len = 4
    rows = augmented_rows(sequences, max_len, first_target)
    # Interleave the users' rows (as RecBole's time-ordered split does), each user's in order.
    rank = {id(row): i for i, row in enumerate(rows)}
    keys = [(rank[id(r)] - min(rank[id(s)] for s in rows if s[0] == r[0])) + rng.random() for r in rows]
    rows = [rows[i] for i in np.argsort(keys, kind="stable")]
    assert [r[0] for r in rows] != sorted(r[0] for r in rows), "the rows should be interleaved"

    users, offsets, items = user_sequences(*as_arrays(rows))
    rebuilt = {int(u): items[offsets[i] : offsets[i + 1]].tolist() for i, u in enumerate(users)}
    # A user's first row holds its first_target items before the first target (capped at max_len);
    # users without a target after those have no rows.
    expected = {u: seq[max(0, first_target - max_len) :] for u, seq in sequences.items() if len(seq) > first_target}
    assert rebuilt == expected


def test_user_sequences_refuse_rows_that_are_not_prefixes():
    rows = augmented_rows({1: [5, 6, 7, 8, 9]}, max_len=3)
    rows[1], rows[2] = rows[2], rows[1]  # one user's rows out of order
    with pytest.raises(ValueError, match="not the prefixes"):
        user_sequences(*as_arrays(rows))


def cut_windows_loop(seq_lengths, max_len, stride=None):
    """The twin of cut_windows: walk each sequence's targets from its end, stride at a time."""
    stride = stride or max_len
    windows = []
    for s, n in enumerate(seq_lengths):
        end = n - 1
        while end > 0:
            start = max(0, end - max_len)
            if start == 0:  # the earliest window: it scores every target left
                windows.append((s, start, end - start, 0))
                break
            windows.append((s, start, end - start, max_len - stride))  # scores its last stride
            end -= stride
    return windows


def as_tuples(*columns):
    return list(zip(*(c.tolist() for c in columns)))


def test_cut_windows_equals_a_loop():
    seq_lengths = [1, 2, 3, 4, 5, 8, 9, 10, 17, 2]
    assert as_tuples(*cut_windows(seq_lengths, max_len=4)) == cut_windows_loop(seq_lengths, 4)


@pytest.mark.parametrize("max_len", [2, 3, 5, 8])
def test_cut_windows_with_a_stride_equals_a_loop(max_len):
    rng = np.random.default_rng(max_len)
    seq_lengths = np.concatenate([[0, 1, 2, max_len, max_len + 1, max_len + 2], rng.integers(0, 40, size=60)])
    for stride in range(1, max_len + 1):
        windows = cut_windows(seq_lengths, max_len, stride)
        assert as_tuples(*windows) == cut_windows_loop(seq_lengths, max_len, stride), stride
        n_targets = np.maximum(seq_lengths - 1, 0)
        expected_count = np.where(n_targets > 0, 1 + np.ceil(np.maximum(n_targets - max_len, 0) / stride), 0)
        assert len(windows[0]) == expected_count.sum()
    # An empty stride is a stride of max_len: the non-overlapping windows, every position scored.
    unset = cut_windows(seq_lengths, max_len)
    assert as_tuples(*unset) == as_tuples(*cut_windows(seq_lengths, max_len, max_len))
    assert (unset[3] == 0).all()


@pytest.mark.parametrize("stride", [None, 1, 2, 4])
def test_windows_score_every_target_once_and_the_first_item_only_an_input(stride):
    seq_lengths = np.array([1, 2, 5, 9, 10, 13])
    max_len = 4
    sequence, start, length, loss_start = cut_windows(seq_lengths, max_len, stride)
    assert length.min() >= 1 and length.max() <= max_len
    for s, n in enumerate(seq_lengths):
        mine = sequence == s
        # (target index, number of inputs before it in its window) of every scored position
        scored = sorted(
            (a + t + 1, t + 1) for a, k, first in zip(start[mine], length[mine], loss_start[mine]) for t in range(first, k)
        )
        assert [target for target, _ in scored] == list(range(1, n)), (n, scored)  # items 1 .. n-1 once
        for target, n_inputs in scored:
            # The whole history up to max_len - stride + 1 items, however far into the sequence.
            assert n_inputs >= min(target, max_len - (stride or max_len) + 1), (n, target, n_inputs)


class TinyDataset:
    """The fields TrainingWindows reads from a RecBole training dataset."""

    uid_field, iid_field = "user_id", "item_id"
    item_id_list_field, item_list_length_field = "item_id_list", "item_length"

    def __init__(self, rows):
        users, histories, lengths, targets = as_arrays(rows)
        self.inter_feat = {
            "user_id": torch.tensor(users),
            "item_id_list": torch.tensor(histories),
            "item_length": torch.tensor(lengths),
            "item_id": torch.tensor(targets),
        }


def test_batch_of_windows_is_right_padded_with_shifted_targets():
    sequences = {1: [11, 12, 13, 14, 15, 16], 2: [21, 22]}
    windows = TrainingWindows(TinyDataset(augmented_rows(sequences, max_len=3)), max_len=3)
    # user 1, targets 12..16, from the end: inputs [13 14 15] -> [14 15 16], then [11 12] -> [12 13];
    # user 2: [21] -> [22]
    assert len(windows) == 3 and windows.n_targets == 6
    batch = windows.batch([0, 1, 2])
    assert batch["user_id"].tolist() == [1, 1, 2]
    assert batch["item_id_list"].tolist() == [[13, 14, 15], [11, 12, 0], [21, 0, 0]]
    assert batch["item_length"].tolist() == [3, 2, 1]
    assert batch["item_id"].tolist() == [[14, 15, 16], [12, 13, 0], [22, 0, 0]]


def test_overlapping_windows_hold_their_context_with_target_0():
    sequences = {1: [11, 12, 13, 14, 15, 16, 17], 2: [21, 22]}
    windows = TrainingWindows(TinyDataset(augmented_rows(sequences, max_len=3)), max_len=3, stride=2)
    # user 1, targets 12..17, from the end two at a time: inputs [14 15 16] scoring -> [16 17],
    # [12 13 14] scoring -> [14 15], then the earliest [11 12] scoring both; user 2: [21] -> [22]
    assert len(windows) == 4 and windows.n_targets == 7 and windows.n_inputs == 9
    batch = windows.batch([0, 1, 2, 3])
    assert batch["user_id"].tolist() == [1, 1, 1, 2]
    assert batch["item_id_list"].tolist() == [[14, 15, 16], [12, 13, 14], [11, 12, 0], [21, 0, 0]]
    assert batch["item_length"].tolist() == [3, 3, 2, 1]
    assert batch["item_id"].tolist() == [[0, 16, 17], [0, 14, 15], [12, 13, 0], [22, 0, 0]]


# On real data, through the dataloaders ------------------------------------------------------------

MAX_LEN = 8


@pytest.fixture(scope="module")
def loaders(tiny_ml100k):
    """RecBole's prefix loaders, and the all_positions loaders by window_stride, for the same tiny slice."""
    data_path, name = tiny_ml100k
    settings = {**FAST_SETTINGS, "data_path": data_path, "MAX_ITEM_LIST_LENGTH": MAX_LEN, "train_batch_size": 16}
    built = {}
    for key, mode, stride in (("prefix", "prefix", None), ("all_positions", "all_positions", None),
                              ("all_positions_stride_3", "all_positions", 3)):
        config = Config("Mamba4Rec", name, config_dict={**settings, "train_mode": mode, "window_stride": stride})
        built[key] = data_preparation(config, create_dataset(config))
    return built


def one_epoch(loader):
    return [batch for batch in loader]


@pytest.mark.parametrize("stride", [None, 3])
def test_an_epoch_has_every_training_target_exactly_once_with_its_history(loaders, stride):
    prefix_train = loaders["prefix"][0]
    all_train = loaders["all_positions" if stride is None else f"all_positions_stride_{stride}"][0]
    assert isinstance(all_train, WindowDataLoader)
    n_context = MAX_LEN - (stride or MAX_LEN)  # positions a full window holds for context only
    rows = prefix_train.dataset.inter_feat
    # RecBole's rows: (user, target) -> the history before the target. ml-100k has each
    # (user, item) once, so a pair names one training interaction.
    history = {
        (u, t): h[:n].tolist()
        for u, t, h, n in zip(
            rows["user_id"].tolist(), rows["item_id"].tolist(), rows["item_id_list"], rows["item_length"].tolist()
        )
    }
    assert len(history) == len(rows)

    seen = collections.Counter()
    context_windows = 0
    for batch in one_epoch(all_train):
        assert batch["item_id_list"].shape == batch["item_id"].shape == (len(batch), MAX_LEN)
        for u, inputs, n, targets in zip(
            batch["user_id"].tolist(), batch["item_id_list"], batch["item_length"].tolist(), batch["item_id"]
        ):
            assert (inputs[n:] == 0).all() and (targets[n:] == 0).all() and (inputs[:n] > 0).all()
            # Context-only positions (target 0) come first: none, or n_context of a full window.
            first_scored = int((targets[:n] == 0).sum())
            assert (targets[first_scored:n] > 0).all()
            assert first_scored == 0 or (first_scored == n_context and n == MAX_LEN)
            context_windows += first_scored > 0
            for t in range(first_scored, n):
                key = (u, targets[t].item())
                seen[key] += 1
                # The window's inputs up to t are the end of RecBole's history for that target,
                # at least n_context + 1 items of it (all of it when it is shorter).
                assert inputs[: t + 1].tolist() == history[key][-(t + 1) :], key
                assert t + 1 >= min(n_context + 1, len(history[key])), key
    assert (context_windows > 0) == (n_context > 0)
    assert seen == collections.Counter(history.keys())  # every training target, exactly once

    # Each user's first item (the input of RecBole's first row) is never a target.
    first_rows = rows["item_length"] == 1
    for u, first in zip(rows["user_id"][first_rows].tolist(), rows["item_id_list"][first_rows, 0].tolist()):
        assert (u, first) not in seen


def test_windows_are_shuffled_every_epoch(loaders):
    all_train = loaders["all_positions"][0]
    orders = [
        [tuple(row.tolist()) for batch in one_epoch(all_train) for row in batch["item_id_list"]] for _ in range(2)
    ]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_validation_and_test_loaders_are_recboles_and_unchanged(loaders):
    for phase in (1, 2):
        prefix_loader, all_loader = loaders["prefix"][phase], loaders["all_positions"][phase]
        assert type(all_loader) is type(prefix_loader)
        assert type(all_loader).__module__.startswith("recbole.data.dataloader")
        for prefix_batch, all_batch in zip(prefix_loader, all_loader, strict=True):
            # (interaction, history index, positive users, positive items)
            torch.testing.assert_close(all_batch[0].interaction, prefix_batch[0].interaction)
            torch.testing.assert_close(all_batch[1:], prefix_batch[1:])


def test_prefix_mode_is_recboles_own_data_preparation(tiny_ml100k):
    data_path, name = tiny_ml100k
    config = Config("Mamba4Rec", name, config_dict={**FAST_SETTINGS, "data_path": data_path})
    ours = data_preparation(config, create_dataset(config))
    theirs = recbole_data_preparation(config, create_dataset(config))
    for mine, recbole_loader in zip(ours, theirs):
        assert type(mine) is type(recbole_loader) and len(mine) == len(recbole_loader)
