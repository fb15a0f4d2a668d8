"""The training dataloader of ``train_mode: all_positions``: batches of user windows.

A subclass of RecBole's ``AbstractDataLoader``, so RecBole's Trainer uses it as it uses its own
training dataloader (``len``, iteration, ``shuffle``, ``dataset``, distributed sampling). An epoch
is every window once, in a new random order each epoch; ``train_batch_size`` counts windows.
"""

from logging import getLogger

import numpy as np
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.utils import set_color

from recbole_mamba.data.windows import TrainingWindows


class WindowDataLoader(AbstractDataLoader):
    """Batches of :class:`~recbole_mamba.data.windows.TrainingWindows` of RecBole's training ``dataset``.

    Args:
        config: the run's Config (``MAX_ITEM_LIST_LENGTH``, ``window_stride``, ``train_batch_size``, ``seed``, ``worker``).
        dataset: RecBole's training dataset (the augmented prefix rows of the training split), or
            the training split of a :class:`~recbole_mamba.data.flat_dataset.FlatSequenceDataset`.
        sampler: unused (negatives are drawn by the model); kept for RecBole's signature.
        shuffle: new window order every epoch.
    """

    def __init__(self, config, dataset, sampler=None, shuffle=True):
        self.windows = TrainingWindows(dataset, config["MAX_ITEM_LIST_LENGTH"], config["window_stride"])
        self.sample_size = len(self.windows)
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        getLogger().info(
            set_color("[Training]: ", "pink")
            + f"all_positions: {len(self.windows):,} windows of up to {self.windows.max_len} items, "
            f"window_stride {self.windows.stride}: {self.windows.n_inputs:,} input tokens for "
            f"{self.windows.n_targets:,} targets per epoch (training interactions: {len(dataset):,})"
        )

    def _init_batch_size_and_step(self):
        batch_size = self.config["train_batch_size"]
        self.step = batch_size
        self.set_batch_size(batch_size)

    def collate_fn(self, index):
        return self.windows.batch(np.asarray(index))
