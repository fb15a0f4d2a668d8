"""SASRecAllPositions: RecBole's SASRec in prefix mode, exactly; all-position losses equal to the prefix ones."""

import pytest
import torch
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mamba.config import Config
from recbole_mamba.errors import UserInputError
from recbole_mamba.model import SASRecAllPositions
from tests.test_mamba4rec import (
    MAX_LEN, N_ITEMS, STRIDE_TARGETS, WINDOW_LENGTHS, WINDOW_TARGETS, WINDOWS, ItemCountOnly, batch, prefix_rows,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "MAX_ITEM_LIST_LENGTH": MAX_LEN}


def build(model_class=SASRecAllPositions, seed=0, **settings):
    config = Config(model_class.__name__, "any-dataset", config_dict={**NO_DROPOUT, **settings})
    torch.manual_seed(seed)
    return model_class(config, ItemCountOnly(N_ITEMS))


def test_prefix_mode_is_recboles_sasrec():
    ours = build(train_mode="prefix")
    recbole = build(SASRec)
    assert ours.state_dict().keys() == recbole.state_dict().keys()
    for key, value in recbole.state_dict().items():  # same initialisation from the same seed
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    rows = prefix_rows(ours)
    torch.testing.assert_close(ours.calculate_loss(rows), recbole.calculate_loss(rows), rtol=0, atol=0)
    torch.testing.assert_close(ours.full_sort_predict(rows), recbole.full_sort_predict(rows), rtol=0, atol=0)


@pytest.mark.parametrize("loss_type, window_targets", [("CE", WINDOW_TARGETS), ("CE", STRIDE_TARGETS),
                                                       ("SampledSoftmax", WINDOW_TARGETS)])
def test_all_position_loss_equals_the_mean_of_the_prefix_losses(loss_type, window_targets, monkeypatch):
    # The same weights trained on windows and on RecBole's prefix rows of the same targets.
    all_positions = build(train_mode="all_positions", loss_type=loss_type, ce_chunk_size=5)
    prefix_model = build(train_mode="all_positions", loss_type=loss_type)
    prefix_model.load_state_dict(all_positions.state_dict())
    if loss_type == "SampledSoftmax":  # the same negatives for both
        negatives = torch.tensor([2, 3, 17, 21, 29])
        for model in (all_positions, prefix_model):
            monkeypatch.setattr(model, "draw_negatives", lambda targets, shape: negatives)
    windows = batch(all_positions, WINDOWS, WINDOW_LENGTHS, **{all_positions.POS_ITEM_ID: window_targets})
    loss_all = all_positions.calculate_loss(windows)
    rows = prefix_rows(prefix_model, window_targets)
    last = prefix_model(rows[prefix_model.ITEM_SEQ], rows[prefix_model.ITEM_SEQ_LEN])  # RecBole's forward
    loss_prefix = prefix_model.position_loss(last, rows[prefix_model.POS_ITEM_ID])
    torch.testing.assert_close(loss_all, loss_prefix, rtol=1e-5, atol=1e-6)
    loss_all.backward()
    loss_prefix.backward()
    for (name, p_all), p_prefix in zip(all_positions.named_parameters(), prefix_model.parameters()):
        torch.testing.assert_close(p_all.grad, p_prefix.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_encode_is_causal_and_forward_still_gathers_the_last_position():
    model = build().eval()
    changed = WINDOWS.clone()
    changed[0, 3:] = torch.tensor([1, 2, 4])
    with torch.no_grad():
        a, b = model.encode(WINDOWS, WINDOW_LENGTHS), model.encode(changed, WINDOW_LENGTHS)
        last = model(WINDOWS, WINDOW_LENGTHS)
    assert a.shape == (len(WINDOWS), MAX_LEN, 64)
    torch.testing.assert_close(a[0, :3], b[0, :3])
    assert not torch.allclose(a[0, 3:], b[0, 3:])
    torch.testing.assert_close(last, a[torch.arange(len(WINDOWS)), WINDOW_LENGTHS - 1])


@pytest.mark.parametrize("settings, message", [
    ({"loss_type": "BCE", "train_mode": "prefix"}, "loss_type BCE needs train_mode all_positions for SASRecAllPositions"),
    ({"loss_type": "MSE"}, "loss_type must be one of CE, BPR, BCE, SampledSoftmax, got 'MSE'"),
    ({"ce_chunk_size": 0}, "ce_chunk_size must be an integer >= 1, got 0"),
])
def test_bad_config_values(settings, message):
    with pytest.raises(UserInputError, match=message):
        Config("SASRecAllPositions", "any-dataset", config_dict=settings)


def test_bce_model_keeps_its_loss_type():
    config = Config("SASRecAllPositions", "any-dataset", config_dict={**NO_DROPOUT, "loss_type": "BCE"})
    model = SASRecAllPositions(config, ItemCountOnly(N_ITEMS))
    assert model.loss_type == "BCE" and config["loss_type"] == "BCE"  # RecBole's __init__ saw CE only
    loss = model.calculate_loss(batch(model, WINDOWS, WINDOW_LENGTHS, **{model.POS_ITEM_ID: WINDOW_TARGETS}))
    loss.backward()
    assert torch.isfinite(loss) and model.item_embedding.weight.grad.abs().sum() > 0
