"""Training windows for all-position training, cut from RecBole's own training split.

RecBole's sequential training set holds one row per training target: the target item and its
history (the up to ``MAX_ITEM_LIST_LENGTH`` items before it). A causal model predicts every
position's next item in one pass, so the same targets are covered by far fewer, longer samples:

1. :func:`user_sequences` rebuilds each user's training sequence from those rows: the first row's
   history (one item with RecBole's augmentation), then every row's target in order (with
   ``sequence_storage: flat`` the sequences are stored as such, see
   :mod:`recbole_mamba.data.flat_dataset`, and nothing is rebuilt);
2. :func:`cut_windows` cuts each sequence, from its end backwards, into windows of at most
   ``max_len`` inputs whose next items are the targets. Consecutive windows end ``stride`` targets
   apart, and a window's loss is taken only at the targets no later window scores, so every target
   is scored exactly once and a user's first item is only ever an input. With ``stride < max_len``
   windows overlap: the first ``max_len - stride`` positions of a window are context only, giving
   its scored targets a longer history;
3. :class:`TrainingWindows` stores the sequences once (a flat item array with offsets) and builds
   a batch of windows on demand.

Everything is vectorised over rows: no Python loop per interaction.
"""

import numpy as np
import torch
from recbole.data.interaction import Interaction


def user_sequences(user_ids, histories, history_lengths, targets):
    """Each user's training sequence, from RecBole's augmented rows.

    Args:
        user_ids: (R,) the user of each row.
        histories: (R, L) each row's history, right-padded.
        history_lengths: (R,) real items in each history.
        targets: (R,) each row's target item.

    A user's rows must appear in time order (RecBole's splits keep them so); rows of different
    users may interleave.

    Returns:
        ``(users, offsets, items)``: user ``users[u]``'s sequence is
        ``items[offsets[u]:offsets[u + 1]]``.

    Raises:
        ValueError: if the rows are not the prefixes of one sequence per user.
    """
    user_ids, histories = np.asarray(user_ids), np.asarray(histories)
    history_lengths, targets = np.asarray(history_lengths), np.asarray(targets)
    n_rows, max_len = histories.shape
    order = np.argsort(user_ids, kind="stable")  # group rows by user, keeping their time order
    user_ids, histories = user_ids[order], histories[order]
    history_lengths, targets = history_lengths[order], targets[order]
    if n_rows and history_lengths.min() < 1:
        raise ValueError("every training row needs a history of at least one item")

    is_first = np.ones(n_rows, dtype=bool)
    is_first[1:] = user_ids[1:] != user_ids[:-1]
    first_rows = np.flatnonzero(is_first)
    user_of_row = np.cumsum(is_first) - 1
    rank = np.arange(n_rows) - first_rows[user_of_row]  # index of a row among its user's rows
    prefix_len = history_lengths[first_rows]  # items before the user's first target
    seq_len = prefix_len + np.diff(np.append(first_rows, n_rows))
    offsets = np.concatenate([[0], np.cumsum(seq_len)])

    items = np.empty(offsets[-1], dtype=histories.dtype)
    columns = np.arange(max_len)
    in_prefix = columns[None, :] < prefix_len[:, None]
    items[(offsets[:-1, None] + columns)[in_prefix]] = histories[first_rows][in_prefix]
    target_pos = offsets[user_of_row] + prefix_len[user_of_row] + rank
    items[target_pos] = targets

    # Each row must be the prefix ending just before its target: its length is the capped number
    # of items before the target, and its last item is the one just before the target.
    expected_len = np.minimum(prefix_len[user_of_row] + rank, max_len)
    last_item = histories[np.arange(n_rows), history_lengths - 1]
    if (history_lengths != expected_len).any() or (last_item != items[target_pos - 1]).any():
        raise ValueError(
            "the training rows are not the prefixes of one time-ordered sequence per user "
            "(RecBole's sequential augmentation)"
        )
    return user_ids[first_rows], offsets, items


def cut_windows(seq_lengths, max_len, stride=None):
    """Cut sequences into windows of at most ``max_len`` inputs, from each sequence's end backwards.

    A sequence of n items has n - 1 targets (items 1 .. n-1, each predicted from the items before
    it); window j (0 = the latest) holds the inputs ``[max(0, e - max_len), e)`` with
    ``e = n - 1 - j * stride``, and their targets one item later. Its loss is taken at its last
    ``stride`` positions, the targets the later windows do not score; the earliest window, the one
    that starts at input 0, scores all its positions no later window scores, and is the last one
    cut. ``stride`` None means ``max_len``: windows that do not overlap, every position scored.

    Returns:
        ``(sequence, start, length, loss_start)`` per window: the sequence it comes from, its first
        input's index within that sequence, its number of inputs, and the first of its positions
        whose target is scored (the ones before are context only).
    """
    stride = max_len if stride is None else stride
    seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
    n_targets = np.maximum(seq_lengths - 1, 0)
    # One window holding the first max_len targets, plus one per stride of the targets after them.
    n_windows = np.where(n_targets > 0, 1 + -(-np.maximum(n_targets - max_len, 0) // stride), 0)
    sequence = np.repeat(np.arange(len(seq_lengths)), n_windows)
    first_window = np.cumsum(n_windows) - n_windows
    back = np.arange(len(sequence)) - np.repeat(first_window, n_windows)  # 0 = latest window
    end = n_targets[sequence] - back * stride
    start = np.maximum(end - max_len, 0)
    # Every window but the earliest is full (max_len inputs) and scores its last stride positions.
    loss_start = np.where(start > 0, max_len - stride, 0)
    return sequence, start, end - start, loss_start


def _training_sequences(dataset):
    """``(users, starts, lengths, items)``: user ``users[k]``'s training sequence is
    ``items[starts[k]:starts[k] + lengths[k]]``, users in ascending id order."""
    if hasattr(dataset, "training_sequences"):  # sequence_storage flat: the sequences are stored as such
        users, starts, lengths = dataset.training_sequences()
        return users, starts, lengths, dataset.sequence_items.long()
    feat = dataset.inter_feat  # RecBole's prefix rows: rebuild the sequences from them
    users, offsets, items = user_sequences(
        feat[dataset.uid_field].numpy(),
        feat[dataset.item_id_list_field].numpy(),
        feat[dataset.item_list_length_field].numpy(),
        feat[dataset.iid_field].numpy(),
    )
    return users, offsets[:-1], np.diff(offsets), torch.from_numpy(items).long()


class TrainingWindows:
    """Every training window of a RecBole sequential training set, and batches of them.

    A batch is an :class:`~recbole.data.interaction.Interaction` with RecBole's field names:
    ``user_id`` (B,), ``item_id_list`` (B, max_len) right-padded with 0, ``item_length`` (B,) and
    ``item_id`` (B, max_len): the target at each position (the next item), 0 at padding and at a
    window's context-only positions (see :func:`cut_windows`), so a model scores the positions whose
    target is > 0.
    """

    def __init__(self, dataset, max_len, stride=None):
        self.max_len = max_len
        self.stride = max_len if stride is None else stride
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.item_seq_field, self.item_len_field = dataset.item_id_list_field, dataset.item_list_length_field
        users, starts, lengths, items = _training_sequences(dataset)
        sequence, start, length, loss_start = cut_windows(lengths, max_len, stride)
        self.items = items
        self.window_user = torch.from_numpy(users[sequence]).long()
        self.window_start = torch.from_numpy(starts[sequence] + start).long()
        self.window_length = torch.from_numpy(length).long()
        self.window_loss_start = torch.from_numpy(loss_start).long()
        self.n_inputs = int(length.sum())
        self.n_targets = int((length - loss_start).sum())

    def __len__(self):
        return len(self.window_length)

    def batch(self, index):
        """The windows ``index`` as one Interaction."""
        index = torch.as_tensor(index, dtype=torch.long)
        length = self.window_length[index]
        columns = torch.arange(self.max_len + 1)
        # Items start .. start + length: the inputs, plus the last target.
        in_window = columns[None, :] <= length[:, None]
        position = torch.where(in_window, self.window_start[index, None] + columns, 0)
        items = torch.where(in_window, self.items[position], 0)
        is_input = columns[None, : self.max_len] < length[:, None]
        is_scored = columns[None, : self.max_len] >= self.window_loss_start[index, None]
        return Interaction(
            {
                self.uid_field: self.window_user[index],
                self.item_seq_field: items[:, :-1] * is_input,
                self.item_len_field: length,
                self.iid_field: items[:, 1:] * is_scored,
            }
        )
