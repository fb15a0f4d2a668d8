"""Search spaces for :mod:`recbole_mamba.tune`, read from YAML.

Each top-level key is a RecBole setting; its value names one distribution and its arguments::

    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}   # log-uniform float in [low, high]
    dropout_prob:  {uniform: [0.1, 0.5]}            # uniform float in [low, high]
    num_layers:    {choice: [1, 2]}                 # one of the values, drawn at random
    hidden_size:   {randint: [32, 128]}             # integer in [low, high], both ends included
    d_state:       {grid: [16, 32]}                 # every value, each with every other sample

Settings that stay fixed during a search go in ``--config_files`` or ``--key=value``, not here.
This module only reads and checks the file; it needs no Ray.
"""

import math

from recbole.config import Config as RecBoleConfig

from recbole_mamba.config import _read_yaml_mapping
from recbole_mamba.errors import UserInputError, is_int

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

# Keys a search cannot vary: they say what is searched and where the trials write.
NOT_SEARCHABLE = ("model", "dataset", "data_path", "checkpoint_dir", "gpu_id")

_EXAMPLE = "e.g. 'learning_rate: {loguniform: [1.0e-4, 1.0e-2]}'"


def load_search_space(path):
    """Read and check a search-space file; returns ``{key: (distribution, arguments)}``."""
    # RecBole's loader reads 1e-4 as a float (plain YAML 1.1 reads it as a string).
    content = _read_yaml_mapping(path, RecBoleConfig._build_yaml_loader(None))
    if not content:
        raise UserInputError(f"Search space '{path}' is empty: give at least one key to search, {_EXAMPLE}.")
    space = {}
    for key, spec in content.items():
        space[key] = _parse_entry(path, key, spec)
    return space


def _parse_entry(path, key, spec):
    where = f"Search space '{path}', key '{key}'"
    if key in NOT_SEARCHABLE:
        raise UserInputError(f"{where}: '{key}' cannot be searched (fix it with --{key}=... instead).")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserInputError(
            f"{where}: expected one distribution ({', '.join(DISTRIBUTIONS)}) with its arguments, "
            f"{_EXAMPLE}; got {spec!r}."
        )
    (distribution, args), = spec.items()
    if distribution in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserInputError(f"{where}: {distribution} needs a non-empty list of values, got {args!r}.")
        return distribution, list(args)
    low, high = _low_high(where, distribution, args)
    if distribution == "randint":
        if not all(is_int(v) for v in (low, high)):
            raise UserInputError(f"{where}: randint needs two integers [low, high], got {args!r}.")
        if low > high:
            raise UserInputError(f"{where}: randint needs low <= high, got {args!r}.")
        return distribution, [low, high]
    if low >= high:
        raise UserInputError(f"{where}: {distribution} needs low < high, got {args!r}.")
    if distribution == "loguniform" and low <= 0:
        raise UserInputError(f"{where}: loguniform needs 0 < low < high, got {args!r}.")
    return distribution, [float(low), float(high)]


def _low_high(where, distribution, args):
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args)
    ):
        raise UserInputError(f"{where}: {distribution} needs two numbers [low, high], got {args!r}.")
    return args


def to_tune(space):
    """The Ray Tune ``param_space`` for a checked space."""
    from ray import tune

    makers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda args: tune.uniform(*args),
        "loguniform": lambda args: tune.loguniform(*args),
        "randint": lambda args: tune.randint(args[0], args[1] + 1),  # Tune's upper bound is exclusive
    }
    return {key: makers[distribution](args) for key, (distribution, args) in space.items()}


def uses_grid(space):
    return any(distribution == "grid" for distribution, _ in space.values())


def grid_size(space):
    """Trials per sample: every combination of the grid values (1 without a grid)."""
    return math.prod(len(args) for distribution, args in space.values() if distribution == "grid")
