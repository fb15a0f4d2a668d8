"""The plugin's Trainer: RecBole's, with the autocast dtype set by ``amp_dtype``."""

import itertools

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer as RecBoleTrainer

from recbole_mamba.data.loading import load_dataset, prepare_dataloaders
from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config
from recbole_mamba.trainer import Trainer, get_trainer
from tests.conftest import FAST_SETTINGS


def one_epoch_dtypes(tiny_ml100k, **settings):
    """Train a few batches on the CPU; return the dtypes the Mamba block's in_proj produced."""
    data_path, name = tiny_ml100k
    config = create_config("Mamba4Rec", name, config_dict={
        **FAST_SETTINGS, "data_path": data_path, "use_gpu": False, "mamba_backend": "torch", **settings})
    config["device"] = torch.device("cpu")  # RecBole picks the GPU wherever there is one
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = config.model_class(config, train_data._dataset)
    seen = set()
    model.mamba_layers[0].mamba.in_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    trainer = get_trainer(config)(config, model)
    assert isinstance(trainer, Trainer)
    trainer._train_epoch(itertools.islice(train_data, 3), 0)  # a few batches show the dtypes
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


# The training loop without a host-device sync per batch -------------------------------------------


def trained_one_epoch(tiny_ml100k, train_epoch, loss_hook=None, batches=8, **settings):
    """(epoch loss, parameters) after an epoch of ``train_epoch(trainer, train_data, 0)`` cut to
    ``batches`` batches (as RecBole's loop, ours iterates whatever it is given), same seed."""
    from recbole.utils import init_seed

    data_path, name = tiny_ml100k
    config = create_config("Mamba4Rec", name, config_dict={
        **FAST_SETTINGS, "data_path": data_path, "use_gpu": False, "mamba_backend": "torch", **settings})
    config["device"] = torch.device("cpu")  # RecBole picks the GPU wherever there is one
    train_data, _, _ = prepare_dataloaders(config, load_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset)
    if loss_hook is not None:
        original = model.calculate_loss
        model.calculate_loss = lambda interaction: loss_hook(original(interaction))
    trainer = Trainer(config, model)
    loss = train_epoch(trainer, itertools.islice(train_data, batches), 0)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("settings", [{}, {"clip_grad_norm": {"max_norm": 0.01}}, {"train_mode": "all_positions"}])
def test_sync_free_loop_trains_exactly_as_recboles(tiny_ml100k, settings):
    ours_loss, ours = trained_one_epoch(tiny_ml100k, Trainer._train_epoch, **settings)
    recbole_loss, theirs = trained_one_epoch(tiny_ml100k, RecBoleTrainer._train_epoch, **settings)
    assert isinstance(ours_loss, float)
    assert ours_loss == pytest.approx(recbole_loss, rel=1e-5)  # float32 sum on the device vs Python floats
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_sync_free_loop_returns_the_parts_of_a_tuple_loss(tiny_ml100k):
    def two_parts(loss):
        return loss, 2 * loss

    ours_loss, _ = trained_one_epoch(tiny_ml100k, Trainer._train_epoch, loss_hook=two_parts)
    recbole_loss, _ = trained_one_epoch(tiny_ml100k, RecBoleTrainer._train_epoch, loss_hook=two_parts)
    assert isinstance(ours_loss, tuple) and ours_loss == pytest.approx(recbole_loss, rel=1e-5)


@pytest.mark.parametrize("nan_gradients", [False, True])
def test_sync_free_loop_stops_on_a_nan_loss(tiny_ml100k, monkeypatch, nan_gradients):
    batches = []

    def nan_from_the_second_batch(loss):
        batches.append(1)
        if len(batches) < 2:
            return loss
        # NaN value with intact gradients, or NaN gradients (the parameters become NaN, and the
        # next forward pass fails in the selective scan's input check before the NaN check)
        return loss * float("nan") if nan_gradients else loss + float("nan") * loss.detach()

    monkeypatch.setattr(Trainer, "nan_check_every", 3)
    with pytest.raises(ValueError, match="Training loss is nan") as error:
        trained_one_epoch(tiny_ml100k, Trainer._train_epoch, loss_hook=nan_from_the_second_batch)
    if nan_gradients:  # the third batch's forward pass failed; the NaN is reported, that failure chained
        assert len(batches) == 2 and "must be finite" in str(error.value.__cause__)
    else:  # found by the check after the third batch
        assert len(batches) == 3
