"""``data_preparation``: RecBole's, with the training dataloader that ``train_mode`` asks for.

- ``prefix`` (the default): RecBole's own training dataloader, one sample per training target
  (the target and the up to ``MAX_ITEM_LIST_LENGTH`` items before it), exactly as in RecBole.
- ``all_positions``: :class:`~recbole_mamba.data.dataloader.WindowDataLoader`, built from the same
  training split; each sample is a window of a user's sequence and every position is a target.

Validation and test dataloaders are RecBole's in both modes (leave-one-out, full ranking).

How the dataset holds the sequences is ``sequence_storage``'s choice, made when it is created
(:func:`create_sequence_dataset`): ``prefix``, RecBole's SequentialDataset with its table of every
target's history; ``flat``, :class:`~recbole_mamba.data.flat_dataset.FlatSequenceDataset`, each
user's history once, the histories of a batch built when it is drawn. The dataloaders are the same.
"""

from recbole.data import create_dataset
from recbole.data import data_preparation as recbole_data_preparation

from recbole_mamba.data.dataloader import WindowDataLoader
from recbole_mamba.data.flat_dataset import FlatSequenceDataset

TRAIN_MODES = ("prefix", "all_positions")
SEQUENCE_STORAGES = ("prefix", "flat")


def create_sequence_dataset(config):
    """RecBole's ``create_dataset``, or a :class:`FlatSequenceDataset` for ``sequence_storage: flat``."""
    if config["sequence_storage"] == "flat":
        return FlatSequenceDataset(config)
    return create_dataset(config)


def data_preparation(config, dataset):
    """Split ``dataset`` and build (train, valid, test) dataloaders as RecBole does, honouring ``train_mode``."""
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if config["train_mode"] == "all_positions":
        train_data = WindowDataLoader(config, train_data.dataset, shuffle=config["shuffle"])
    return train_data, valid_data, test_data
