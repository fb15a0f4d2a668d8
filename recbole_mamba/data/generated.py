"""Generated lifelong data: users with thousands of interactions, written as a RecBole atomic file.

GENERATED DATA, NOT REAL USER BEHAVIOUR. It exists to exercise and benchmark long sequences (memory,
speed, that training runs end to end) where no real dataset of that shape is at hand; accuracy
numbers on it say nothing about real recommendation quality.

Each user's sequence mixes three behaviours, so next-item prediction is neither trivial nor noise:

- popularity: fresh items follow a Zipf-like law (the item of popularity rank r is drawn with
  probability proportional to ``r ** -zipf_exponent``);
- taste that drifts: each item belongs to one of ``n_topics`` topics; a fresh item comes from the
  user's current topic with probability ``topic_prob`` (else from all items), and the current topic
  changes with probability ``topic_switch_prob`` at each step, so recent history tells the topic;
- repeats: with probability ``repeat_prob`` the user re-consumes one of its last ``repeat_window``
  items (uniformly).

Everything is drawn with numpy from one seed, vectorised (no Python loop per interaction), so the
same arguments give the same file. :func:`write_lifelong_dataset` writes
``<data_path>/<name>/<name>.inter`` (``user_id:token``, ``item_id:token``, ``timestamp:float``)
and ``<name>.generated.yaml`` (the arguments), which the data loading sees and logs.

    python -m recbole_mamba.data.generated --data_path=dataset --users=500 --mean_length=4000
"""

import argparse
import os
import shutil
import tempfile

import numpy as np
import yaml

from recbole_mamba.errors import UserInputError, is_int

NAME_PREFIX = "generated-lifelong"
MARKER_SUFFIX = ".generated.yaml"

DEFAULTS = {
    "users": 200,
    "items": 5000,
    "mean_length": 3000,
    "min_length": 5,
    "zipf_exponent": 1.0,
    "n_topics": 50,
    "topic_prob": 0.7,
    "topic_switch_prob": 0.002,
    "repeat_prob": 0.3,
    "repeat_window": 20,
    "seed": 0,
}


def default_name(users, mean_length, seed):
    return f"{NAME_PREFIX}-u{users}-l{mean_length}-s{seed}"


def check_arguments(args):
    """Raise UserInputError naming the argument, its value and what is valid."""
    for key in ("users", "items", "mean_length", "min_length", "n_topics", "repeat_window"):
        value = args[key]
        if not is_int(value) or value < 1:
            raise UserInputError(f"Generated data: {key} must be an integer >= 1, got {value!r}.")
    if args["min_length"] < 2:
        raise UserInputError(f"Generated data: min_length must be >= 2 (a history and a target), got {args['min_length']}.")
    if args["items"] < args["n_topics"]:
        raise UserInputError(f"Generated data: items ({args['items']}) must be >= n_topics ({args['n_topics']}).")
    for key in ("topic_prob", "topic_switch_prob", "repeat_prob"):
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserInputError(f"Generated data: {key} must be a probability in [0, 1], got {value!r}.")
    value = args["zipf_exponent"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserInputError(f"Generated data: zipf_exponent must be a number >= 0, got {value!r}.")


def generate_lifelong(**kwargs):
    """``(user, item, timestamp)`` int64 arrays, sorted by user then time; ids start at 1.

    Keyword arguments: those of :data:`DEFAULTS` (any left out take its value).
    """
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise UserInputError(f"Generated data: unknown argument(s) {', '.join(sorted(unknown))}; "
                             f"the arguments are {', '.join(DEFAULTS)}.")
    a = {**DEFAULTS, **kwargs}
    check_arguments(a)
    rng = np.random.default_rng(a["seed"])

    # Sequence lengths: log-normal around mean_length (a few users much longer), at least min_length.
    sigma = 0.5
    lengths = rng.lognormal(np.log(a["mean_length"]) - sigma**2 / 2, sigma, size=a["users"])
    lengths = np.maximum(np.rint(lengths).astype(np.int64), a["min_length"])
    n = int(lengths.sum())
    user = np.repeat(np.arange(1, a["users"] + 1), lengths)
    user_first = np.cumsum(lengths) - lengths
    step = np.arange(n) - np.repeat(user_first, lengths)  # index within the user's sequence

    # Items: a random popularity order.
    popularity = np.arange(1, a["items"] + 1, dtype=np.float64) ** -a["zipf_exponent"]
    item_by_rank = rng.permutation(a["items"]) + 1
    weight = np.empty(a["items"] + 1)
    weight[item_by_rank] = popularity
    weight[0] = 0.0
    # Topics of equal size (every topic has items), at random.
    topic_of_item = np.concatenate([[-1], rng.permutation(a["items"]) % a["n_topics"]])

    # The user's topic at each step: a new one at the start and at each switch.
    switch = (step == 0) | (rng.random(n) < a["topic_switch_prob"])
    segment = np.cumsum(switch) - 1
    topic = rng.integers(a["n_topics"], size=int(switch.sum()))[segment]

    # Fresh items: from the current topic or from all items, by popularity.
    fresh = _draw(rng, np.arange(a["items"] + 1), weight, n)
    from_topic = np.flatnonzero(rng.random(n) < a["topic_prob"])
    for t in range(a["n_topics"]):  # a loop over topics, not interactions
        at = from_topic[topic[from_topic] == t]
        members = np.flatnonzero(topic_of_item == t)
        fresh[at] = _draw(rng, members, weight[members], len(at))

    # Repeats: copy the item lag steps back (lag <= repeat_window, within the user).
    repeat = (step > 0) & (rng.random(n) < a["repeat_prob"])
    lag = np.minimum(rng.integers(1, a["repeat_window"] + 1, size=n), np.maximum(step, 1))
    item = resolve_repeats(fresh, np.where(repeat, lag, 0))

    # Timestamps: each user starts somewhere in a year and acts every few minutes on average.
    start = rng.integers(0, 365 * 86400, size=a["users"])
    gaps = rng.geometric(1 / 300, size=n)
    gaps[user_first] = 0
    timestamp = np.repeat(start, lengths) + _cumsum_within(gaps, user_first, lengths)
    return user, item, timestamp


def resolve_repeats(fresh, lag):
    """``item[t] = item[t - lag[t]]`` where ``lag[t] > 0``, else ``fresh[t]``, without a loop over t.

    A repeat may copy a repeat: each position's pointer is followed (pointer jumping, doubling the
    distance covered every round) until it reaches a fresh item, in at most log2(n) rounds.
    """
    source = np.arange(len(fresh)) - lag
    while True:
        followed = source[source]
        if np.array_equal(followed, source):
            return fresh[source]
        source = followed


def _draw(rng, values, weight, size):
    """``size`` draws from ``values`` with probabilities proportional to ``weight`` (inverse CDF)."""
    cdf = np.cumsum(weight)
    index = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return values[np.minimum(index, len(values) - 1)]


def _cumsum_within(values, first, lengths):
    """Cumulative sums of ``values`` restarting at each user's first index."""
    total = np.cumsum(values)
    return total - np.repeat(total[first] - values[first], lengths)


def write_lifelong_dataset(data_path, name=None, **kwargs):
    """Generate the data and write ``<data_path>/<name>/<name>.inter`` (plus the marker file).

    Nothing is left half-written: the folder appears complete or not at all, and an existing
    folder of that name is an error (delete it to regenerate). Returns ``(folder, name)``.
    """
    a = {**DEFAULTS, **kwargs}
    user, item, timestamp = generate_lifelong(**kwargs)
    name = name or default_name(a["users"], a["mean_length"], a["seed"])
    if not name.startswith(NAME_PREFIX):
        raise UserInputError(f"Generated data: the name must start with '{NAME_PREFIX}' (it marks the data "
                             f"as generated), got {name!r}.")
    folder = os.path.join(data_path, name)
    if os.path.exists(folder):
        raise UserInputError(f"Generated data: '{folder}' already exists; delete it to generate it again.")
    os.makedirs(data_path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=data_path)
    try:
        with open(os.path.join(staging, f"{name}.inter"), "w", encoding="utf-8") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            np.savetxt(f, np.column_stack([user, item, timestamp]), fmt="%d", delimiter="\t")
        marker = {"generated_by": "recbole_mamba.data.generated", "note": "generated data, not real user behaviour",
                  "interactions": int(len(user)), **a}
        with open(os.path.join(staging, name + MARKER_SUFFIX), "w", encoding="utf-8") as f:
            yaml.safe_dump(marker, f, sort_keys=False)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder, name


def generated_note(data_path, name):
    """A log line saying the dataset is generated (with its arguments), or None for other data."""
    marker = os.path.join(data_path, name + MARKER_SUFFIX)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        settings = yaml.safe_load(f) or {}
    described = ", ".join(f"{k}={settings[k]}" for k in DEFAULTS if k in settings)
    return (f"Dataset {name} is GENERATED data (recbole_mamba.data.generated: {described}), "
            "not real user behaviour: its metrics say nothing about real recommendation quality.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default="dataset", help="folder to write <name>/<name>.inter into")
    parser.add_argument("--name", default=None, help=f"dataset name (default {NAME_PREFIX}-u<users>-l<mean_length>-s<seed>)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    data_path, name = args.pop("data_path"), args.pop("name")
    try:
        folder, name = write_lifelong_dataset(data_path, name, **args)
    except UserInputError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {folder} (generated data); train on it with --dataset={name} --data_path={data_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
