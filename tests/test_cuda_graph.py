"""``cuda_graph``: the encoder's training forward and backward replayed as CUDA graphs.

On a GPU, a graphed training step is checked against the same step run eagerly (the slow, obvious
twin): loss and every parameter's gradient, with dropout off; with dropout on, each replay draws new
masks. Elsewhere: when the graph is (not) used, and the configuration check.
"""

import copy

import pytest
import torch

from recbole_mamba.config import Config
from recbole_mamba.errors import UserInputError
from recbole_mamba.model import Mamba4Rec, RecMamba
from recbole_mamba.nn.cuda_graph import GraphedTraining
from tests.test_mamba4rec import ItemCountOnly

N_ITEMS = 50
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build(model_class=RecMamba, **settings):
    name = model_class.__name__
    config = Config(name, "any-dataset", config_dict={"hidden_size": 16, "d_state": 8, "num_layers": 2,
                                                       "MAX_ITEM_LIST_LENGTH": 64, **settings})
    torch.manual_seed(0)
    return model_class(config, ItemCountOnly(N_ITEMS)).to(config["device"])


def batch(model, rows=4, length=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS, (rows, length + 1), generator=generator)
    lengths = torch.full((rows,), length)
    lengths[-1] = length - 5  # one window with padding: unscored positions stay out of the loss
    items[-1, length - 5:] = 0
    device = next(model.parameters()).device
    return {model.ITEM_SEQ: items[:, :-1].to(device), model.ITEM_SEQ_LEN: lengths.to(device),
            model.POS_ITEM_ID: items[:, 1:].to(device)}


def loss_and_grads(model, interaction):
    model.zero_grad(set_to_none=True)
    loss = model.calculate_loss(interaction)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_defaults_and_bad_value():
    assert build(mamba_backend="torch").cuda_graph is True  # RecMamba: on by default
    assert build(Mamba4Rec, mamba_backend="torch", train_mode="all_positions").cuda_graph is False
    with pytest.raises(UserInputError, match="cuda_graph must be true or false, got 'yes'"):
        build(mamba_backend="torch", cuda_graph="yes")


def test_the_torch_backend_runs_eagerly_and_copies_drop_the_graph():
    # The torch backend (whose scan checks its inputs on the host) never captures, on any device.
    model = build(mamba_backend="torch")
    model.train()
    loss_and_grads(model, batch(model))
    assert model._training_graph is None
    cpu_model = build(mamba_backend="torch").cpu()
    cpu_model._training_graph = GraphedTraining(cpu_model, cpu_model._encode_columns)
    assert not cpu_model._training_graph.covers(batch(cpu_model)[cpu_model.ITEM_SEQ])  # CPU tensors
    assert copy.deepcopy(cpu_model)._training_graph is None


@needs_gpu
@pytest.mark.parametrize("model_class", [RecMamba, Mamba4Rec])
def test_graphed_step_matches_the_eager_step(model_class):
    settings = {"mamba_backend": "cuda", "scan_kernel": "triton", "dropout_prob": 0.0, "train_mode": "all_positions"}
    eager, graphed = build(model_class, cuda_graph=False, **settings), build(model_class, cuda_graph=True, **settings)
    graphed.load_state_dict(eager.state_dict())
    eager.train(), graphed.train()
    # The first step builds the graph, the next ones replay it on new batches; the last has fewer
    # rows (an epoch's last batch), padded to the graph's.
    for seed, rows in ((1, 4), (2, 4), (3, 4), (4, 3)):
        interaction = batch(eager, rows=rows, seed=seed)
        expected_loss, expected = loss_and_grads(eager, interaction)
        loss, grads = loss_and_grads(graphed, interaction)
        assert graphed._training_graph.built
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_gpu
def test_replays_draw_new_dropout_masks_and_other_shapes_run_eagerly():
    model = build(mamba_backend="cuda", scan_kernel="triton", dropout_prob=0.3)
    model.train()
    interaction = batch(model)
    first, _ = loss_and_grads(model, interaction)
    second, _ = loss_and_grads(model, interaction)
    assert model._training_graph.built and not torch.equal(first, second)
    assert model._training_graph.covers(batch(model, rows=1)[model.ITEM_SEQ])  # padded to the graph's rows
    for other in (batch(model, rows=5), batch(model, length=32)):  # more rows, other length: eager
        assert not model._training_graph.covers(other[model.ITEM_SEQ])
        loss, grads = loss_and_grads(model, other)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    model.eval()
    assert not model._training_graph.covers(interaction[model.ITEM_SEQ])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()
        assert not model._training_graph.covers(interaction[model.ITEM_SEQ])


@needs_gpu
def test_graphed_training_follows_the_eager_training():
    """Ten Adam steps, graphed and eager from the same weights (dropout off): the same losses."""
    settings = {"mamba_backend": "cuda", "scan_kernel": "triton", "dropout_prob": 0.0}
    trajectories = {}
    for graphed in (False, True):
        model = build(cuda_graph=graphed, **settings)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        full, last = batch(model, rows=4, seed=1), batch(model, rows=3, seed=2)
        losses = []
        for step in range(10):
            optimizer.zero_grad(set_to_none=True)
            loss = model.calculate_loss(last if step % 3 == 2 else full)  # some steps padded
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        assert (model._training_graph is not None and model._training_graph.built) == graphed
        trajectories[graphed] = losses
    assert trajectories[True][-1] < trajectories[True][0]
    torch.testing.assert_close(trajectories[True], trajectories[False], rtol=1e-3, atol=1e-5)
