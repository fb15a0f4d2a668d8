"""BatchPrefetcher: the dataloader's batches, in its order, built in a background thread."""

import threading

import pytest
import torch

from recbole_mamba.data.loading import load_dataset, prepare_dataloaders
from recbole_mamba.data.prefetch import BatchPrefetcher
from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config
from tests.conftest import FAST_SETTINGS

CPU = torch.device("cpu")


def training_loader(tiny_ml100k, **settings):
    data_path, name = tiny_ml100k
    config = create_config("Mamba4Rec", name, config_dict={
        **FAST_SETTINGS, "data_path": data_path, "use_gpu": False, "mamba_backend": "torch",
        "train_batch_size": 64, **settings})
    config["device"] = CPU
    train_data, _, _ = prepare_dataloaders(config, load_dataset(config))
    return train_data


def prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == "recbole-mamba-prefetch"]


@pytest.mark.parametrize("settings", [{}, {"train_mode": "all_positions"}])
def test_batches_and_their_order_are_the_loaders(tiny_ml100k, settings):
    plain = training_loader(tiny_ml100k, **settings)
    prefetched = BatchPrefetcher(training_loader(tiny_ml100k, **settings), CPU, depth=2)
    assert len(prefetched) == len(plain) > 3
    for _ in range(2):  # the second epoch is shuffled anew, by the same generator
        expected, got = list(plain), list(prefetched)
        assert len(got) == len(expected)
        for want, have in zip(expected, got):
            assert set(have.interaction) == set(want.interaction)
            for key, value in want.interaction.items():
                assert torch.equal(have[key], value), key
    assert not prefetch_threads()


def test_a_loader_error_reaches_the_training_thread():
    class Broken:
        def __len__(self):
            return 3

        def __iter__(self):
            yield "first batch"
            raise KeyError("item_id missing in batch 2")

    got = []
    with pytest.raises(KeyError, match="item_id missing in batch 2"):
        for batch in BatchPrefetcher(Broken(), CPU):
            got.append(batch)
    assert got == ["first batch"]
    assert not prefetch_threads()


def test_stopping_early_ends_the_thread_and_the_next_epoch_starts_afresh():
    produced = []

    class Counting:
        def __len__(self):
            return 100

        def __iter__(self):
            for i in range(100):
                produced.append(i)
                yield i

    prefetcher = BatchPrefetcher(Counting(), CPU, depth=3)
    for batch in prefetcher:
        if batch == 4:
            break
    assert not prefetch_threads()
    assert len(produced) <= 5 + 3 + 1  # it ran at most `depth` (and the one being handed over) ahead
    assert list(prefetcher) == list(range(100))


def test_bad_depths_are_refused(tiny_ml100k):
    with pytest.raises(ValueError, match="depth must be at least 1"):
        BatchPrefetcher([], CPU, depth=0)
    data_path, name = tiny_ml100k
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(UserInputError, match="prefetch_batches must be an integer >= 0"):
            create_config("Mamba4Rec", name, config_dict={"data_path": data_path, "prefetch_batches": bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("train_mode", ["prefix", "all_positions"])
def test_on_cuda_training_with_prefetching_is_training_without(tiny_ml100k, train_mode, monkeypatch):
    from recbole.utils import init_seed

    from recbole_mamba.model import mamba4rec
    from recbole_mamba.trainer import Trainer

    # nn.Embedding's own backward: deterministic, unlike index_add_'s atomic adds, so that the two
    # runs can be compared bit for bit.
    monkeypatch.setattr(mamba4rec, "embedding_lookup", lambda indices, embedding: embedding(indices))
    # Likewise the Triton CE's two-kernel backward (fixed order) instead of its one-kernel one (atomics).
    from recbole_mamba.nn import triton_ce

    two_kernels = dict.fromkeys(("forward", "grad_hidden", "grad_weight"), (64, 64, 4, 3))
    monkeypatch.setattr(triton_ce, "launch_config", lambda d: two_kernels)
    results = {}
    for depth in (0, 2):
        train_data = training_loader(tiny_ml100k, train_mode=train_mode, prefetch_batches=depth, use_gpu=True)
        config = train_data.config
        config["device"] = torch.device("cuda")
        init_seed(config["seed"], config["reproducibility"])
        model = config.model_class(config, train_data._dataset).cuda()
        trainer = Trainer(config, model)
        losses = [trainer._train_epoch(train_data, epoch) for epoch in range(2)]
        results[depth] = losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert results[2][0] == results[0][0]
    for key, value in results[0][1].items():
        assert torch.equal(results[2][1][key], value), key
    batch = next(iter(BatchPrefetcher(train_data, torch.device("cuda"))))
    assert all(value.is_cuda for value in batch.interaction.values())
