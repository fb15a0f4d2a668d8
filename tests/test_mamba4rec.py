"""Mamba4Rec: architecture as published, parameter count, scoring consistency, causality."""

import pytest
import torch
from recbole.data import create_dataset

from recbole_mamba.config import Config
from recbole_mamba.model import Mamba4Rec
from tests.conftest import shared_dataset


class ItemCountOnly:
    """What SequentialRecommender reads from a dataset: the number of item ids (padding included)."""

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def build(n_items=50, **settings):
    config = Config("Mamba4Rec", "any-dataset", config_dict={"mamba_backend": "torch", **settings})
    return Mamba4Rec(config, ItemCountOnly(n_items)), config


def batch(model, item_seq, item_seq_len, **extra):
    return {model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: item_seq_len, **extra}


def test_parameter_count_matches_reference_for_ml1m_item_count():
    # ml-1m after 5-core filtering has 3,416 items, so 3,417 ids with padding; the reference
    # implementation reports 290,944 trainable parameters for it.
    model, _ = build(n_items=3417)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 290_944


def test_parameter_count_on_real_ml1m():
    data_path = shared_dataset("ml-1m")
    config = Config("Mamba4Rec", "ml-1m", config_dict={"data_path": data_path, "mamba_backend": "torch"})
    dataset = create_dataset(config)
    model = Mamba4Rec(config, dataset)
    assert dataset.item_num == 3417
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 290_944


def test_state_dict_uses_reference_module_names():
    model, _ = build(num_layers=2)
    names = set(model.state_dict())
    for layer in (0, 1):
        prefix = f"mamba_layers.{layer}."
        for name in (
            "mamba.in_proj.weight",
            "mamba.conv1d.weight",
            "mamba.conv1d.bias",
            "mamba.x_proj.weight",
            "mamba.dt_proj.weight",
            "mamba.dt_proj.bias",
            "mamba.A_log",
            "mamba.D",
            "mamba.out_proj.weight",
            "LayerNorm.weight",
            "ffn.w_1.weight",
            "ffn.w_2.weight",
            "ffn.LayerNorm.weight",
        ):
            assert prefix + name in names
    assert {"item_embedding.weight", "LayerNorm.weight", "LayerNorm.bias"} <= names


def test_residual_only_with_several_layers():
    single, _ = build(num_layers=1)
    double, _ = build(num_layers=2)
    assert [layer.residual for layer in single.mamba_layers] == [False]
    assert [layer.residual for layer in double.mamba_layers] == [True, True]


def test_full_sort_scores_equal_pointwise_scores():
    torch.manual_seed(0)
    model, _ = build(n_items=30)
    model.eval()
    item_seq = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 3, 4, 5]])
    item_seq_len = torch.tensor([3, 5])
    full = model.full_sort_predict(batch(model, item_seq, item_seq_len))
    for item in (1, 17, 29):
        pointwise = model.predict(batch(model, item_seq, item_seq_len, **{model.ITEM_ID: torch.tensor([item, item])}))
        torch.testing.assert_close(full[:, item], pointwise)


def test_output_ignores_padding_and_future_items():
    # Causal model, right padding: what stands after position item_seq_len - 1 must not matter,
    # whether the batch is cut to its longest sequence (alone) or not (beside a longer one).
    torch.manual_seed(0)
    model, _ = build(n_items=30, num_layers=2)
    model.eval()
    prefix = torch.tensor([[4, 9, 2, 11]])
    long_row = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    lengths = torch.tensor([4, 10])
    padded = torch.cat([prefix, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    followed = torch.cat([prefix, torch.tensor([[1, 2, 3, 4, 5, 6]])], dim=1)
    out_padded = model(torch.cat([padded, long_row]), lengths)
    out_followed = model(torch.cat([followed, long_row]), lengths)
    out_alone = model(padded, lengths[:1])
    torch.testing.assert_close(out_followed, out_padded)
    torch.testing.assert_close(out_alone, out_padded[:1], rtol=1e-5, atol=1e-6)
    # ... while changing an earlier item does change it (the test can fail).
    changed = padded.clone()
    changed[0, 1] = 20
    assert not torch.allclose(model(changed, lengths[:1]), out_alone)


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_losses_are_finite_and_backpropagate(loss_type):
    torch.manual_seed(0)
    extra = {"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}} if loss_type == "BPR" else {}
    model, _ = build(n_items=30, loss_type=loss_type, **extra)
    item_seq = torch.randint(1, 30, (4, 6))
    interaction = batch(
        model,
        item_seq,
        torch.tensor([6, 3, 1, 5]),
        **{model.POS_ITEM_ID: torch.randint(1, 30, (4,)), model.NEG_ITEM_ID: torch.randint(1, 30, (4,))},
    )
    loss = model.calculate_loss(interaction)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.mamba_layers[0].mamba.A_log.grad.abs().sum() > 0
