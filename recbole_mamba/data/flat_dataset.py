"""``sequence_storage: flat``: a RecBole sequential dataset that keeps each user's history once.

RecBole's :class:`~recbole.data.dataset.SequentialDataset` turns every interaction but a user's
first into a row holding its whole history (``data_augmentation``): interactions x
``MAX_ITEM_LIST_LENGTH`` entries per list field, which cannot be held for lifelong histories
(thousands of items per user). :class:`FlatSequenceDataset` keeps instead

- ``sequence_items``: every item id, sorted by (user, time) as RecBole sorts them before its
  augmentation, and ``user_start``: where each user's items begin in it;
- ``inter_feat``: one row per target (every interaction but a user's first, as RecBole's rows), with
  the loaded fields of that interaction and ``POSITION_FIELD``, the target's index in
  ``sequence_items``. A row's history is ``sequence_items[max(user_start, position - L):position]``.

Everything else is RecBole's: the time ordering, the split of ``eval_args`` (leave-one-out is
re-done here in numpy, with the same result as RecBole's loop), samplers and dataloaders. Indexing
the dataset (``dataset[index]``, which every RecBole dataloader does) builds the histories of just
those rows, so RecBole's dataloaders hand models the ``item_id_list`` / ``item_length`` fields they
expect, and its full-sort evaluation runs unchanged. Memory stays O(interactions) whatever
``MAX_ITEM_LIST_LENGTH`` is; per batch, histories take batch x ``MAX_ITEM_LIST_LENGTH`` entries.

Only ``item_id_list`` and ``item_length`` are built (not RecBole's lists of other fields such as
``timestamp_list``, which the sequential models here do not read).
"""

import numpy as np
import torch
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils.enum_type import FeatureSource, FeatureType

# Column of inter_feat holding each target's index into sequence_items (travels with every sort
# and split RecBole applies to the rows); dropped from the interactions handed to models.
POSITION_FIELD = "sequence_position"

LEAVE_ONE_OUT_PARTS = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}


class FlatSequenceDataset(SequentialDataset):
    """RecBole's sequential dataset without the prefix table (see the module docstring)."""

    def _change_feat_format(self):
        Dataset._change_feat_format(self)  # DataFrames -> Interactions, without the augmentation
        self._check_field("uid_field", "time_field")
        self._history_presets()
        # The order RecBole's augmentation sorts by, so histories and targets are the same as its.
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        users = self.inter_feat[self.uid_field].numpy()
        is_first = np.ones(len(users), dtype=bool)
        is_first[1:] = users[1:] != users[:-1]
        self.sequence_items = self.inter_feat[self.iid_field].clone()
        # Indexed by user id (ids are 1..user_num-1; a user without interactions keeps 0, unused).
        self.user_start = np.zeros(self.user_num, dtype=np.int64)
        self.user_start[users[is_first]] = np.flatnonzero(is_first)
        targets = np.flatnonzero(~is_first)
        rows = self.inter_feat[torch.from_numpy(targets)]
        rows.update(Interaction({POSITION_FIELD: torch.from_numpy(targets)}))
        self.inter_feat = rows

    def _history_presets(self):
        """Declare item_id_list and item_length as RecBole's augmentation would (its _aug_presets)."""
        self.item_id_list_field = self.iid_field + self.config["LIST_SUFFIX"]
        self.set_field_property(
            self.item_id_list_field, FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, self.max_item_list_len
        )
        self.set_field_property(self.item_list_length_field, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)

    def data_augmentation(self):
        raise RuntimeError("FlatSequenceDataset never builds RecBole's prefix table")

    def histories(self, positions, users):
        """``item_id_list`` (N, MAX_ITEM_LIST_LENGTH), right-padded, and ``item_length`` (N,) of the
        targets at ``positions`` of ``users``: the up to MAX_ITEM_LIST_LENGTH items before each."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        first = torch.from_numpy(self.user_start)[torch.as_tensor(users, dtype=torch.long)]
        start = torch.maximum(first, positions - self.max_item_list_len)
        length = positions - start
        columns = torch.arange(self.max_item_list_len)
        is_item = columns[None, :] < length[:, None]
        index = torch.where(is_item, start[:, None] + columns, 0)
        items = torch.where(is_item, self.sequence_items[index], 0)
        return Interaction({self.item_id_list_field: items, self.item_list_length_field: length})

    def __getitem__(self, index, join=True):
        rows = self.inter_feat[index]
        rows.update(self.histories(rows[POSITION_FIELD], rows[self.uid_field]))
        rows.drop(POSITION_FIELD)
        return self.join(rows) if join else rows

    def training_sequences(self):
        """Each user's sequence up to its last target in this dataset (the training split).

        Returns:
            ``(users, starts, lengths)``: user ``users[k]``'s sequence is
            ``sequence_items[starts[k]:starts[k] + lengths[k]]``, users in ascending id order. The
            first item of each is only an input; the others are this dataset's targets, provided
            they are each user's earliest (as in RecBole's leave-one-out and time-ordered splits).
        """
        users = self.inter_feat[self.uid_field].numpy()
        positions = self.inter_feat[POSITION_FIELD].numpy()
        last = np.full(self.user_num, -1, dtype=np.int64)
        np.maximum.at(last, users, positions)
        users = np.flatnonzero(last >= 0)
        starts = self.user_start[users]
        lengths = last[users] + 1 - starts
        # Every item from a user's first to its last target here must be one of this dataset's
        # targets (or the first, input-only item), or the windows would train on others' targets.
        if lengths.sum() - len(users) != len(positions):
            raise ValueError("the training rows are not the earliest targets of each user")
        return users, starts, lengths

    def leave_one_out(self, group_by, leave_one_mode):
        """RecBole's leave-one-out split (same rows, same order), vectorised with numpy.

        RecBole groups rows by ``group_by`` in order of each group's first row, and gives the last
        row of each group to the test part, the one before to the validation part (each group keeps
        at least one row for training), looping in Python over every row.
        """
        if group_by is None:
            raise ValueError("leave one out strategy require a group field")
        if leave_one_mode not in LEAVE_ONE_OUT_PARTS:
            raise NotImplementedError(f"The leave_one_mode [{leave_one_mode}] has not been implemented.")
        parts = leave_one_out_parts(self.inter_feat[group_by].numpy(), LEAVE_ONE_OUT_PARTS[leave_one_mode])
        if leave_one_mode == "valid_only":
            parts.append(np.empty(0, dtype=np.int64))
        elif leave_one_mode == "test_only":
            parts.insert(1, np.empty(0, dtype=np.int64))
        self._drop_unused_col()
        return [self.copy(self.inter_feat[torch.from_numpy(index)]) for index in parts]


def leave_one_out_parts(groups, leave_one_num):
    """Row indices of each part (train, then the ``leave_one_num`` parts left out), as RecBole's
    ``_split_index_by_leave_one_out`` lists them: groups in order of their first row, each group's
    rows in order; the last row of a group goes to the last part, the one before to the part
    before, and every group keeps at least one row for training."""
    groups = np.asarray(groups)
    n = len(groups)
    # Rows in RecBole's order: groups by their first row, each group's rows in order.
    _, first_row, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.lexsort((np.arange(n), first_row[inverse.ravel()]))
    grouped = groups[order]
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = grouped[1:] != grouped[:-1]
    group_first = np.flatnonzero(is_first)
    group_of = np.cumsum(is_first) - 1
    size = np.diff(np.append(group_first, n))[group_of]
    from_end = size - 1 - (np.arange(n) - group_first[group_of])  # 0 = the group's last row
    n_left_out = np.minimum(leave_one_num, size - 1)
    part = np.where(from_end < n_left_out, leave_one_num - from_end, 0)
    return [order[part == p] for p in range(leave_one_num + 1)]
