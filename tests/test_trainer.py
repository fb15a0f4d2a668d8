"""The plugin's Trainer: RecBole's, with the autocast dtype set by ``amp_dtype``."""

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer as RecBoleTrainer

from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config
from recbole_mamba.trainer import Trainer, get_trainer
from tests.conftest import FAST_SETTINGS


def one_epoch_dtypes(tiny_ml100k, **settings):
    """Train one epoch on the CPU; return the dtypes the Mamba block's in_proj produced."""
    data_path, name = tiny_ml100k
    config = create_config("Mamba4Rec", name, config_dict={
        **FAST_SETTINGS, "data_path": data_path, "use_gpu": False, "mamba_backend": "torch", **settings})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = config.model_class(config, train_data._dataset)
    seen = set()
    model.mamba_layers[0].mamba.in_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    trainer = get_trainer(config)(config, model)
    assert isinstance(trainer, Trainer)
    trainer._train_epoch(train_data, 0)
    return seen


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_amp_dtype_sets_the_autocast_dtype(tiny_ml100k, name, dtype):
    before = torch.get_autocast_dtype("cpu")
    assert one_epoch_dtypes(tiny_ml100k, enable_amp=True, amp_dtype=name) == {dtype}
    assert torch.get_autocast_dtype("cpu") == before  # restored after the epoch


def test_without_amp_training_stays_float32(tiny_ml100k):
    assert one_epoch_dtypes(tiny_ml100k, amp_dtype="bfloat16") == {torch.float32}


def test_bad_amp_dtype_is_refused(tiny_ml100k):
    data_path, name = tiny_ml100k
    with pytest.raises(UserInputError, match="amp_dtype must be one of float16, bfloat16"):
        create_config("Mamba4Rec", name, config_dict={"data_path": data_path, "amp_dtype": "fp8"})


def test_recbole_models_get_the_plugin_trainer(tiny_ml100k):
    data_path, name = tiny_ml100k
    config = create_config("SASRec", name, config_dict={"data_path": data_path})
    assert get_trainer(config) is Trainer and issubclass(Trainer, RecBoleTrainer)
