"""RecMamba: registered with the CLI, its embedding and layer options, its config checks, and a
short training at MAX_ITEM_LIST_LENGTH 4,096 on generated data, evaluated and reloaded."""

import math

import pytest
import torch

from recbole_mamba import load_data_and_model, run
from recbole_mamba.config import Config, get_model
from recbole_mamba.data.generated import write_lifelong_dataset
from recbole_mamba.errors import UserInputError
from recbole_mamba.model import Mamba4Rec, RecMamba
from tests.conftest import TINY_MAMBA
from tests.test_mamba4rec import ItemCountOnly


def build(n_items=40, **settings):
    config = Config("RecMamba", "any-dataset", config_dict={"mamba_backend": "torch", **settings})
    return RecMamba(config, ItemCountOnly(n_items)), config


def test_registered_with_its_defaults():
    assert get_model("recmamba") is RecMamba and issubclass(RecMamba, Mamba4Rec)
    _, config = build()
    assert config["train_mode"] == "all_positions" and config["sequence_storage"] == "flat"
    assert (config["train_batch_size"], config["eval_batch_size"]) == (32, 256)  # windows of thousands of items
    assert config["train_neg_sample_args"]["distribution"] == "none"  # negatives, if any, come from the model


def test_embedding_is_scaled_items_plus_positions():
    torch.manual_seed(0)
    model, _ = build(hidden_size=16, MAX_ITEM_LIST_LENGTH=6)
    item_seq = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0]])
    expected = model.item_embedding(item_seq) * 4.0 + model.position_embedding.weight[:4]
    torch.testing.assert_close(model.embed(item_seq), expected)
    without, _ = build(hidden_size=16, position_embedding=False)
    assert without.position_embedding is None
    torch.testing.assert_close(without.embed(item_seq), without.item_embedding(item_seq) * 4.0)
    assert "position_embedding.weight" not in without.state_dict()


def test_layer_options():
    model, _ = build(num_layers=2, residual=False, ffn=False)
    assert [layer.residual for layer in model.mamba_layers] == [False, False]
    assert not any(".ffn." in name for name in model.state_dict())
    model, _ = build(num_layers=1)
    assert model.mamba_layers[0].residual and "mamba_layers.0.ffn.w_1.weight" in model.state_dict()


def test_position_embedding_holds_16384_positions():
    model, _ = build(MAX_ITEM_LIST_LENGTH=16384, hidden_size=8, d_state=4, expand=1, num_layers=1)
    assert model.position_embedding.num_embeddings == 16384
    model.eval()
    item_seq = torch.randint(1, 40, (1, 16384))
    with torch.no_grad():
        scores = model.full_sort_predict({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: torch.tensor([16384])})
    assert scores.shape == (1, 40) and torch.isfinite(scores).all()


def test_outputs_are_causal():
    torch.manual_seed(0)
    model, _ = build(MAX_ITEM_LIST_LENGTH=12, hidden_size=16, d_state=8)
    model.eval()
    item_seq = torch.randint(1, 40, (2, 12))
    changed = item_seq.clone()
    changed[:, 7:] = torch.randint(1, 40, (2, 5))
    lengths = torch.tensor([12, 12])
    with torch.no_grad():
        a, b = model.encode(item_seq, lengths), model.encode(changed, lengths)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_evaluation_encodes_histories_in_slices_with_the_same_scores():
    torch.manual_seed(0)
    model, _ = build(MAX_ITEM_LIST_LENGTH=12, hidden_size=16, d_state=8, eval_slice_tokens=20)
    lengths = torch.tensor([10, 3, 7, 10, 1])
    item_seq = torch.randint(1, 40, (5, 12)) * (torch.arange(12) < lengths[:, None])  # right-padded
    batch = {model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: lengths}
    encoded_rows = []
    original_encode = model.encode

    def recording_encode(seqs, seq_lengths):
        encoded_rows.append(seqs.size(0))
        return original_encode(seqs, seq_lengths)

    model.encode = recording_encode
    model.eval()
    with torch.no_grad():
        sliced = model.full_sort_predict(batch)
        assert encoded_rows == [2, 2, 1]  # 20 tokens // longest history 10 = 2 histories a slice
        model.eval_slice_tokens = None
        whole = model.full_sort_predict(batch)
    assert encoded_rows[3:] == [5]
    torch.testing.assert_close(sliced, whole)
    model.eval_slice_tokens = 20
    model.train()  # training batches are never sliced (the all-position losses need every position)
    model.forward(item_seq, lengths)
    assert encoded_rows[4:] == [5]


@pytest.mark.parametrize("settings, message", [
    ({"train_mode": "prefix"}, "RecMamba trains with all-position losses only: train_mode must be all_positions, got 'prefix'"),
    ({"position_embedding": "yes"}, "position_embedding must be true or false, got 'yes'"),
    ({"residual": 1}, "residual must be true or false, got 1"),
    ({"ffn": None}, "ffn must be true or false, got None"),
    ({"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
    ({"eval_slice_tokens": 0}, "eval_slice_tokens must be an integer >= 1, or ~ for no slices, got 0"),
    ({"loss_type": "MSE"}, "loss_type must be one of CE, BPR, BCE, SampledSoftmax, got 'MSE'"),
    ({"ce_kernel": "fast"}, "ce_kernel must be one of auto, torch, liger, triton, got 'fast'"),
    pytest.param({"ce_kernel": "liger"}, "ce_kernel liger: Liger-Kernel's cross entropy runs on CUDA GPUs only, and the device is cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="RecBole picks the GPU where there is one")),
])
def test_bad_config_values(settings, message):
    with pytest.raises(UserInputError, match=message):
        Config("RecMamba", "any-dataset", config_dict={"mamba_backend": "torch", **settings})


@pytest.fixture(scope="module")
def lifelong(tmp_path_factory):
    """(data_path, name): generated users of about 4,500 interactions, so windows of 4,096 items."""
    data_path = str(tmp_path_factory.mktemp("lifelong"))
    _, name = write_lifelong_dataset(data_path, users=3, items=200, mean_length=4500, n_topics=4, seed=2)
    return data_path, name


LONG = {
    **TINY_MAMBA, "num_layers": 1, "MAX_ITEM_LIST_LENGTH": 4096, "epochs": 1, "train_batch_size": 2,
    "eval_batch_size": 8, "show_progress": False, "worker": 0, "ce_chunk_size": 1024,
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
}


@pytest.mark.slow
def test_trains_at_length_4096_on_generated_data_and_reloads(lifelong, tmp_path):
    data_path, name = lifelong
    seen_lengths = []
    original_encode = RecMamba.encode

    def recording_encode(self, item_seq, item_seq_len):
        if self.training:
            seen_lengths.append(int(item_seq_len.max()))
        return original_encode(self, item_seq, item_seq_len)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(RecMamba, "encode", recording_encode)
        result = run("RecMamba", name, config_dict={"data_path": data_path, **LONG})
    assert max(seen_lengths) == 4096 and len(seen_lengths) >= 2  # a few steps, full-length windows
    (log_file,) = (tmp_path / "log").rglob("*.log")  # the run's log says the data is generated
    assert f"Dataset {name} is GENERATED data" in log_file.read_text()
    for metrics in (result["best_valid_result"], result["test_result"]):
        assert set(metrics) == {"hit@10", "ndcg@10", "mrr@10"} and all(math.isfinite(v) for v in metrics.values())
    # The checkpoint reloads, through the plugin's safe loader, into the same test metrics.
    config, model, _, _, _, test_data = load_data_and_model(result["model_file"])
    assert isinstance(model, RecMamba) and config["sequence_storage"] == "flat"
    from recbole_mamba.trainer import Trainer

    assert Trainer(config, model).evaluate(test_data, load_best_model=False) == result["test_result"]


def test_command_line_finds_recmamba(lifelong, tmp_path, capsys):
    """run_recbole_mamba.py --model=RecMamba reaches RecMamba's own checks (bad input: exit 2, nothing written)."""
    import run_recbole_mamba

    data_path, name = lifelong
    status = run_recbole_mamba.main(["--model=RecMamba", f"--dataset={name}", f"--data_path={data_path}",
                                     "--train_mode=prefix"])
    assert status == 2
    assert "RecMamba trains with all-position losses only" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
