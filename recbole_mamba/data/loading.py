"""RecBole's ``create_dataset`` and ``data_preparation``, with clear errors for data too small to use.

A dataset whose lines are all fine can still leave nothing to train or evaluate on once RecBole has
filtered it (the 5-core filter of ``yaml/overall.yaml``) and split it (leave-one-out by default).
RecBole then fails far from the cause: "Some feat is empty", a dataloader with ``num_samples=0``,
``topk`` out of range in the evaluator, or a run that silently skips validation. These functions
stop with a :class:`~recbole_mamba.errors.UserInputError` that names the dataset file, what is
empty, and the settings that decide it.
"""

import os
from logging import getLogger

from recbole.utils import EvaluatorType

from recbole_mamba.data.generated import generated_note
from recbole_mamba.data.preparation import create_sequence_dataset, data_preparation  # RecBole's, honouring train_mode
from recbole_mamba.errors import UserInputError

_FILTER_KEYS = ("user_inter_num_interval", "item_inter_num_interval", "val_interval", "rm_dup_inter")


def _describe(config):
    inter_file = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    settings = ", ".join(f"{key}={config[key]}" for key in _FILTER_KEYS if config[key] is not None)
    return inter_file, settings


def load_dataset(config):
    """RecBole's ``create_dataset(config)`` (or the flat dataset of ``sequence_storage: flat``); an
    error that names the filters if they leave nothing."""
    inter_file, settings = _describe(config)
    note = generated_note(config["data_path"], config["dataset"])
    if note:
        getLogger().warning(note)
    try:
        dataset = create_sequence_dataset(config)
    except ValueError as e:
        if "Some feat is empty" not in str(e):  # RecBole's words when filtering removed every row
            raise
        raise UserInputError(
            f"No interactions of '{inter_file}' are left after RecBole's filtering ({settings}). "
            "Relax the filters (e.g. --user_inter_num_interval=\"[0,inf)\" "
            "--item_inter_num_interval=\"[0,inf)\") or use a larger dataset."
        ) from None
    topk = config["topk"] or []
    if config["eval_type"] == EvaluatorType.RANKING and topk:
        real_items = dataset.item_num - 1  # item id 0 is padding
        if max(topk) > dataset.item_num:  # the evaluator takes the top k of item_num scores
            raise UserInputError(
                f"'{inter_file}' has {real_items} item(s) after filtering ({settings}), fewer than "
                f"the largest topk ({max(topk)}) a ranking metric needs: lower topk (e.g. --topk=[5]) "
                "or use a larger dataset."
            )
    return dataset


def prepare_dataloaders(config, dataset):
    """``data_preparation(config, dataset)``; an error if the train, valid or test split is empty."""
    counts = (dataset.user_num - 1, dataset.inter_num)  # before the split, which rebuilds the data
    try:
        loaders = data_preparation(config, dataset)
    except ValueError as e:
        if "num_samples" not in str(e):  # torch's RandomSampler over an empty training split
            raise
        raise _empty_splits(config, counts, ["training"]) from None
    names = ("training", "validation", "test")
    empty = [name for name, loader in zip(names, loaders) if loader is None or len(loader._dataset) == 0]
    if empty:
        raise _empty_splits(config, counts, empty)
    return loaders


def _empty_splits(config, counts, empty):
    inter_file, settings = _describe(config)
    hint = "Use a larger dataset, relax the filters or change eval_args."
    if (config["eval_args"] or {}).get("split") == {"LS": "valid_and_test"}:
        hint = (
            "With this leave-one-out split a user needs at least 2 interactions for a training sample, "
            "3 for a test one and 4 for a validation one. " + hint
        )
    return UserInputError(
        f"The {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty for '{inter_file}' "
        f"({counts[0]} users and {counts[1]} interactions after filtering with {settings}; "
        f"eval_args={config['eval_args']}). "
        + hint
    )
