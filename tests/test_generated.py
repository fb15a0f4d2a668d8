"""The generator of lifelong data: deterministic, shaped as asked (long users, popularity skew,
repeats), written as a RecBole atomic file that loads, and labelled as generated."""

import logging

import numpy as np
import pytest

from recbole_mamba.data import generated
from recbole_mamba.data.generated import generate_lifelong, resolve_repeats, write_lifelong_dataset
from recbole_mamba.errors import UserInputError

SMALL = {"users": 30, "items": 2000, "mean_length": 300, "n_topics": 8, "seed": 3}


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = generate_lifelong(**SMALL), generate_lifelong(**SMALL), generate_lifelong(**{**SMALL, "seed": 4})
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1][:1000], other[1][:1000])


def test_resolve_repeats_equals_a_loop():
    rng = np.random.default_rng(0)
    fresh = rng.integers(1, 50, size=500)
    step = np.tile(np.arange(100), 5)  # five users of 100 steps
    lag = np.where((step > 0) & (rng.random(500) < 0.6), np.minimum(rng.integers(1, 8, size=500), np.maximum(step, 1)), 0)
    expected = fresh.copy()
    for t in range(500):
        if lag[t]:
            expected[t] = expected[t - lag[t]]
    np.testing.assert_array_equal(resolve_repeats(fresh, lag), expected)


def repeat_share(user, item, window):
    """Share of interactions whose item is among the user's previous ``window`` items."""
    hits = np.zeros(len(item), dtype=bool)
    for lag in range(1, window + 1):
        hits[lag:] |= (item[lag:] == item[:-lag]) & (user[lag:] == user[:-lag])
    return hits.mean()


def test_shape_popularity_and_repeats():
    user, item, timestamp = generate_lifelong(**SMALL)
    lengths = np.bincount(user)[1:]
    assert len(lengths) == SMALL["users"] and lengths.min() >= 5
    assert 0.7 * SMALL["mean_length"] < lengths.mean() < 1.3 * SMALL["mean_length"]
    assert item.min() >= 1 and item.max() <= SMALL["items"]
    assert (np.diff(user) >= 0).all()
    same_user = np.diff(user) == 0
    assert (np.diff(timestamp)[same_user] > 0).all()  # time increases within a user
    # Popularity: the 1% most popular items take far more than 1% of the interactions.
    counts = np.sort(np.bincount(item, minlength=SMALL["items"] + 1)[1:])[::-1]
    assert counts[: SMALL["items"] // 100].sum() > 0.1 * len(item)
    # Repeats: with repeat_prob 0 only chance (popular items of the topic) brings back a recent
    # item; with repeat_prob p, a share p of the interactions repeat and the rest as by chance.
    share = {p: repeat_share(*generate_lifelong(**SMALL, repeat_prob=p)[:2], 20) for p in (0.0, 0.5)}
    share[0.3] = repeat_share(user, item, 20)
    assert share[0.0] < 0.4
    for p in (0.3, 0.5):
        assert share[p] == pytest.approx(p + (1 - p) * share[0.0], abs=0.03), share


@pytest.mark.parametrize("settings, message", [
    ({"users": 0}, "users must be an integer >= 1, got 0"),
    ({"repeat_prob": 1.5}, r"repeat_prob must be a probability in \[0, 1\], got 1.5"),
    ({"zipf_exponent": -1}, "zipf_exponent must be a number >= 0, got -1"),
    ({"items": 3, "n_topics": 8}, r"items \(3\) must be >= n_topics \(8\)"),
    ({"colour": 1}, "unknown argument.*colour"),
])
def test_bad_arguments(settings, message):
    with pytest.raises(UserInputError, match=message):
        generate_lifelong(**settings)


def test_written_file_loads_in_recbole_and_is_labelled_generated(tmp_path, caplog):
    from recbole_mamba.config import Config
    from recbole_mamba.data.loading import load_dataset

    folder, name = write_lifelong_dataset(str(tmp_path), **SMALL)
    assert name.startswith("generated-lifelong-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no staging folder left
    with pytest.raises(UserInputError, match="already exists"):
        write_lifelong_dataset(str(tmp_path), **SMALL)
    user, item, _ = generate_lifelong(**SMALL)
    config = Config("Mamba4Rec", name, config_dict={"data_path": str(tmp_path), "sequence_storage": "flat",
                                                    "user_inter_num_interval": "[0,inf)",
                                                    "item_inter_num_interval": "[0,inf)"})
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(config)
    assert dataset.inter_num == len(user) and dataset.user_num - 1 == SMALL["users"]
    assert f"Dataset {name} is GENERATED data" in caplog.text


def test_command_line(tmp_path, capsys):
    assert generated.main([f"--data_path={tmp_path}", "--users=3", "--mean_length=20", "--items=50",
                           "--n_topics=2", "--name=generated-lifelong-cli"]) == 0
    assert "generated-lifelong-cli" in capsys.readouterr().out
    lines = (tmp_path / "generated-lifelong-cli" / "generated-lifelong-cli.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float" and len(lines) > 3 * 5
    with pytest.raises(SystemExit) as exit_info:
        generated.main([f"--data_path={tmp_path}", "--name=lifelong"])
    assert exit_info.value.code == 2 and "must start with 'generated-lifelong'" in capsys.readouterr().err
