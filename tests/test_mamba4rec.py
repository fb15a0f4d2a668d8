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


# All-position training ------------------------------------------------------------------------------

N_ITEMS, MAX_LEN = 30, 6
# Windows as WindowDataLoader builds them: inputs right-padded, the next item at each position.
WINDOWS = torch.tensor([[3, 5, 7, 9, 11, 13], [2, 4, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0], [1, 6, 10, 14, 0, 0]])
WINDOW_TARGETS = torch.tensor(
    [[5, 7, 9, 11, 13, 15], [4, 6, 0, 0, 0, 0], [12, 0, 0, 0, 0, 0], [6, 10, 14, 18, 0, 0]]
)
WINDOW_LENGTHS = torch.tensor([6, 2, 1, 4])
# The same windows cut with window_stride 4: the full window's first 2 positions are context only.
STRIDE_TARGETS = torch.tensor(
    [[0, 0, 9, 11, 13, 15], [4, 6, 0, 0, 0, 0], [12, 0, 0, 0, 0, 0], [6, 10, 14, 18, 0, 0]]
)


def prefix_rows(model, window_targets=WINDOW_TARGETS):
    """RecBole's prefix rows for the windows' scored targets, in the same (window, position) order."""
    rows, lengths, targets = [], [], []
    for window, target, n in zip(WINDOWS, window_targets, WINDOW_LENGTHS.tolist()):
        for t in range(n):
            if target[t] == 0:  # context only
                continue
            rows.append(torch.cat([window[: t + 1], torch.zeros(MAX_LEN - t - 1, dtype=torch.long)]))
            lengths.append(t + 1)
            targets.append(target[t])
    return batch(model, torch.stack(rows), torch.tensor(lengths), **{model.POS_ITEM_ID: torch.stack(targets)})


def twin_models(loss_type, window_stride=None, **settings):
    """The same weights in train_mode all_positions (with ``window_stride``) and prefix, dropout off."""
    common = {"dropout_prob": 0.0, "num_layers": 2, "MAX_ITEM_LIST_LENGTH": MAX_LEN, "loss_type": loss_type, **settings}
    if loss_type == "BPR":  # prefix BPR takes its negatives from RecBole's dataloader
        prefix_settings = {"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}
    else:
        prefix_settings = {}
    torch.manual_seed(0)
    all_positions, _ = build(N_ITEMS, train_mode="all_positions", window_stride=window_stride, **common)
    prefix, _ = build(N_ITEMS, train_mode="prefix", **common, **prefix_settings)
    prefix.load_state_dict(all_positions.state_dict())
    return all_positions, prefix


def window_batch(model, window_targets=WINDOW_TARGETS):
    return batch(model, WINDOWS, WINDOW_LENGTHS, **{model.POS_ITEM_ID: window_targets})


def assert_same_loss_and_gradients(all_positions, prefix, prefix_interaction, window_targets=WINDOW_TARGETS):
    loss_all = all_positions.calculate_loss(window_batch(all_positions, window_targets))
    loss_prefix = prefix.calculate_loss(prefix_interaction)
    torch.testing.assert_close(loss_all, loss_prefix, rtol=1e-5, atol=1e-6)
    loss_all.backward()
    loss_prefix.backward()
    for (name, p_all), p_prefix in zip(all_positions.named_parameters(), prefix.parameters()):
        torch.testing.assert_close(p_all.grad, p_prefix.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stride", [None, 4])
def test_all_position_ce_equals_the_mean_of_the_prefix_losses(stride):
    window_targets = WINDOW_TARGETS if stride is None else STRIDE_TARGETS
    # several chunks, one not full
    all_positions, prefix = twin_models("CE", ce_chunk_size=5, window_stride=stride)
    assert_same_loss_and_gradients(all_positions, prefix, prefix_rows(prefix, window_targets), window_targets)


def test_all_position_ce_is_the_plain_cross_entropy_of_every_position():
    # The twin without chunks, straight from the hidden states of every real position.
    all_positions, _ = twin_models("CE", ce_chunk_size=3)
    loss = all_positions.calculate_loss(window_batch(all_positions))
    hidden = all_positions.encode(WINDOWS, WINDOW_LENGTHS)
    is_real = WINDOW_TARGETS > 0
    logits = hidden[is_real] @ all_positions.item_embedding.weight.t()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, WINDOW_TARGETS[is_real]))


@pytest.mark.parametrize("stride", [None, 4])
@pytest.mark.parametrize("loss_type", ["BPR", "BCE", "SampledSoftmax"])
def test_all_position_sampled_losses_equal_the_prefix_losses_for_the_same_negatives(loss_type, stride, monkeypatch):
    window_targets = WINDOW_TARGETS if stride is None else STRIDE_TARGETS
    all_positions, prefix = twin_models(
        loss_type, num_negatives=1 if loss_type == "BPR" else 3, window_stride=stride
    )
    n_positions = int((window_targets > 0).sum())
    # Fixed negatives (none equal to its position's target) for both models, in position order.
    if loss_type == "SampledSoftmax":
        negatives = torch.tensor([2, 17, 25])
    else:
        negatives = torch.randint(19, N_ITEMS, (n_positions, all_positions.num_negatives))
    for model in (all_positions, prefix):
        monkeypatch.setattr(model, "draw_negatives", lambda targets, shape: negatives)
    rows = prefix_rows(prefix, window_targets)
    if loss_type == "BPR":  # prefix BPR reads its negatives from the batch, as RecBole gives them
        rows[prefix.NEG_ITEM_ID] = negatives[:, 0]
    assert_same_loss_and_gradients(all_positions, prefix, rows, window_targets)


def test_prefix_mode_losses_are_unchanged():
    # CE: softmax over every item at the last position; BPR: RecBole's BPRLoss on its negatives.
    torch.manual_seed(0)
    model, _ = build(N_ITEMS, dropout_prob=0.0)
    rows = prefix_rows(model)
    seq_output = model(rows[model.ITEM_SEQ], rows[model.ITEM_SEQ_LEN])
    expected = torch.nn.functional.cross_entropy(seq_output @ model.item_embedding.weight.t(), rows[model.POS_ITEM_ID])
    torch.testing.assert_close(model.calculate_loss(rows), expected)

    bpr, _ = build(N_ITEMS, dropout_prob=0.0, loss_type="BPR",
                   train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    bpr.load_state_dict(model.state_dict())
    rows[bpr.NEG_ITEM_ID] = torch.randint(1, N_ITEMS, (len(rows[bpr.POS_ITEM_ID]),))
    pos = (seq_output * model.item_embedding(rows[bpr.POS_ITEM_ID])).sum(-1)
    neg = (seq_output * model.item_embedding(rows[bpr.NEG_ITEM_ID])).sum(-1)
    torch.testing.assert_close(bpr.calculate_loss(rows), -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean())


def test_training_modes_and_losses_share_the_state_dict():
    reference = set(build(N_ITEMS)[0].state_dict())
    for settings in ({"train_mode": "all_positions"}, {"loss_type": "SampledSoftmax"}, {"loss_type": "BCE"}):
        assert set(build(N_ITEMS, **settings)[0].state_dict()) == reference


def test_sampled_losses_draw_their_negatives_in_the_model():
    torch.manual_seed(0)
    model, _ = build(N_ITEMS, loss_type="SampledSoftmax", train_mode="all_positions")
    assert model.num_negatives == 256  # the loss's default when num_negatives is empty
    seen = []
    original = model.draw_negatives
    model.draw_negatives = lambda targets, shape: seen.append(shape) or original(targets, shape)
    loss = model.calculate_loss(window_batch(model))
    loss.backward()
    assert seen == [(256,)] and torch.isfinite(loss)
    bce, _ = build(N_ITEMS, loss_type="BCE", negative_sampling="in_batch", num_negatives=2)
    rows = prefix_rows(bce)
    drawn = bce.draw_negatives(rows[bce.POS_ITEM_ID], (500, 2))
    assert set(drawn.unique().tolist()) <= set(rows[bce.POS_ITEM_ID].tolist())
    assert torch.isfinite(bce.calculate_loss(rows))
