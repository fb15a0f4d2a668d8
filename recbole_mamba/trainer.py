"""RecBole's Trainer with what the plugin adds to it, and the choice of trainer for a model.

``Trainer`` changes one thing: RecBole's ``enable_amp`` autocasts to the device's default dtype
(float16 on CUDA, which needs a loss scaler); ``amp_dtype: bfloat16`` autocasts to bfloat16
instead, which does not. The parameters (the SSM's included) stay in float32 either way.
"""

import contextlib

import torch
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_mamba.errors import UserInputError

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(config):
    """The autocast dtype ``config["amp_dtype"]`` names; None (unset) keeps the device's default."""
    name = config["amp_dtype"] if "amp_dtype" in config else None
    if name is None:
        return None
    if name not in AMP_DTYPES:
        raise UserInputError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)} (or unset), got {name!r}.")
    return AMP_DTYPES[name]


@contextlib.contextmanager
def default_autocast_dtype(device_type, dtype):
    """Make ``torch.autocast(device_type)`` without a dtype (as RecBole calls it) use ``dtype``."""
    if dtype is None:
        yield
        return
    previous = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, previous)


class Trainer(RecBoleTrainer):
    """RecBole's Trainer; with ``enable_amp``, autocast runs in ``amp_dtype``."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.amp_dtype = amp_dtype(config)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        with default_autocast_dtype(self.device.type, self.amp_dtype):
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)


def get_trainer(config):
    """The trainer class for ``config``'s model: RecBole's choice, with its generic Trainer replaced by ours."""
    trainer_class = recbole_get_trainer(config["MODEL_TYPE"], config["model"])
    return Trainer if trainer_class is RecBoleTrainer else trainer_class
