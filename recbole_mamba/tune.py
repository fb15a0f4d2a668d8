"""Hyperparameter search with Ray Tune, for the plugin's models and RecBole's alike.

    python run_recbole_mamba.py --model=Mamba4Rec --dataset=amazon-beauty --tune=yaml/tune/mamba4rec.yaml

Each trial trains through :func:`recbole_mamba.quick_start.run` (RecBole's data pipeline and
Trainer) and reports the validation metric after every epoch, so an ASHA scheduler can stop poor
trials early. The test split is never looked at during the search: the best trial is chosen on
validation, and only its checkpoint is then evaluated on test.

What a search writes, in ``<storage_path>/<name>/``: one folder per trial (its RecBole log and
checkpoint), ``trials.csv`` (one row per trial), ``best_config.yaml`` (takes ``--config_files``
directly), ``best_result.yaml`` (validation and test metrics of the best trial) and ``search.yaml``
(what was asked for). Run the same command again and an interrupted search resumes there.

Needs ray 2.6.x, the version RecBole 1.2.1 pins (``pip install "recbole-mamba[tune]"``).
"""

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import logging
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd
import torch
import yaml
from recbole.utils import early_stopping

from recbole_mamba import compat
from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config, format_results, load_data_and_model, run
from recbole_mamba.search_space import grid_size, load_search_space, to_tune, uses_grid
from recbole_mamba.trainer import get_trainer

logger = logging.getLogger(__name__)

SCHEDULERS = ("asha", "fifo")
SEARCH_ALGORITHMS = {"random": None, "optuna": "optuna", "hyperopt": "hyperopt"}  # name -> package it needs

# Set per trial by the search, never taken from the user's settings.
TRIAL_KEYS = ("checkpoint_dir", "gpu_id", "show_progress")


class SearchFailed(RuntimeError):
    """Every trial failed: there is no best configuration."""


class SearchInterrupted(RuntimeError):
    """The search stopped (Ctrl+C) before every trial ended; the same command resumes it."""


@dataclasses.dataclass
class SearchOptions:
    num_samples: int = 10
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: validations every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep about 1 / reduction_factor of trials at each rung
    search_alg: str = "random"
    search_seed: int = 2020
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    ray_address: str = None  # None: start Ray on this machine
    storage_path: str = "ray_results"
    name: str = None  # None: <model>-<dataset>


@dataclasses.dataclass
class SearchResult:
    table: pd.DataFrame  # one row per trial, best first
    best_trial: str
    best_params: dict
    best_config_file: str
    valid_metric: str  # as RecBole names it, e.g. NDCG@10
    valid_result: dict
    test_result: dict
    experiment_dir: str


# The trial: runs in a Ray worker -------------------------------------------------------------------


def train_trial(params, request):
    """Train one configuration; report the validation metric to Tune after every validation."""
    from ray.air import session

    trial_dir = session.get_trial_dir()
    # RecBole writes log/ and log_tensorboard/ into the working directory: each trial into its own.
    os.chdir(trial_dir)
    torch.set_num_threads(max(1, int(request["cpus_per_trial"])))
    # Its own checkpoint folder (RecBole names checkpoints by the second); a trial restarted after
    # an interruption starts from scratch, so what its first run saved goes.
    checkpoint_dir = os.path.join(trial_dir, "saved")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    config_dict = {
        **request["fixed"],
        **plain(params),
        "checkpoint_dir": checkpoint_dir,
        "gpu_id": assigned_gpu_id(),
        "show_progress": False,
    }
    state = {"best": -math.inf if request["mode"] == "max" else math.inf, "steps": 0}

    def report(epoch_idx, valid_score):
        # RecBole's own early-stopping rule tells whether this validation is the trial's last.
        state["best"], state["steps"], stop, _ = early_stopping(
            valid_score, state["best"], state["steps"], request["stopping_step"], request["mode"] == "max"
        )
        finished = bool(stop) or epoch_idx + 1 == request["epochs"]
        session.report({request["metric"]: float(valid_score), "epoch": epoch_idx + 1, "finished": finished})

    run(request["model"], request["dataset"], config_dict=config_dict, callback_fn=report, evaluate_test=False)


def assigned_gpu_id():
    """The GPUs Ray gave this trial, as RecBole's ``gpu_id``.

    RecBole's Config sets ``CUDA_VISIBLE_DEVICES`` to ``gpu_id`` (default "0"): left alone, every
    trial would use GPU 0 whatever Ray assigned, and a CPU-only trial would still see a GPU.
    """
    import ray

    return ",".join(str(gpu) for gpu in ray.get_gpu_ids())


def plain(values):
    """numpy scalars (as Tune samples them) as Python numbers, which YAML and RecBole both take."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in values.items()}


# The search: runs in the driver --------------------------------------------------------------------


def search(model, dataset, space_file, config_file_list=None, cmd_args=(), options=None):
    """Run a Ray Tune search, pick the best trial on validation, evaluate it on test.

    Args:
        model, dataset, config_file_list, cmd_args: as for :func:`recbole_mamba.run`; they fix
            every setting that is not searched.
        space_file: YAML search space (see :mod:`recbole_mamba.search_space`).
        options: :class:`SearchOptions`.

    Returns:
        :class:`SearchResult`. Raises ``UserInputError`` for bad input (before anything is
        written), :class:`SearchFailed` when every trial failed, and :class:`SearchInterrupted`
        when the search was stopped before its end (run it again to resume).
    """
    options = options or SearchOptions()
    require_ray_tune()
    space = load_search_space(space_file)
    base = create_config(model, dataset, config_file_list, cmd_args=cmd_args)
    _check_space_against_config(space, base, space_file)
    _check_options(options, space, base)
    request = _trial_request(base, options)
    name = options.name or f"{base['model']}-{base['dataset']}"
    _check_name(name)
    storage_path = os.path.abspath(options.storage_path)
    experiment_dir = os.path.join(storage_path, name)
    _record_request(experiment_dir, base, space, request, options)

    import ray

    started_ray = _start_ray(options.ray_address)
    try:
        results = _tuner(space, request, options, name, storage_path).fit()
    finally:
        if started_ray:
            ray.shutdown()

    if _interrupted(experiment_dir, options.num_samples * grid_size(space)):
        raise SearchInterrupted(
            f"The search stopped before all its trials ended; run the same command to resume it from {experiment_dir}."
        )
    rows = trial_rows(results, request)
    table = trial_table(rows, list(space), request)
    table.to_csv(os.path.join(experiment_dir, "trials.csv"), index=False)
    candidates = [row for row in rows if row["status"] != "failed" and row["best"] is not None]
    if not candidates:
        raise SearchFailed(
            f"No trial finished a validation ({len(rows)} trials); see the 'error' column of "
            f"{experiment_dir}/trials.csv and each trial's error.txt."
        )
    best = (max if request["mode"] == "max" else min)(candidates, key=lambda row: row["best"])
    best_params = {key: best["params"][key] for key in space}
    best_config_file = _write_best_config(experiment_dir, base, request, best_params, best, name)
    valid_result, test_result = evaluate_checkpoint(best["checkpoint"])
    with open(os.path.join(experiment_dir, "best_result.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(
            {"trial": best["trial"], "valid": _floats(valid_result), "test": _floats(test_result)}, f, sort_keys=False
        )
    return SearchResult(
        table, best["trial"], best_params, best_config_file, base["valid_metric"], valid_result, test_result, experiment_dir
    )


def require_ray_tune():
    """Ray Tune 2.6 must import: the search uses its 2.6 API (RecBole 1.2.1 pins ray <= 2.6.3)."""
    try:
        import pyarrow.fs  # noqa: F401  (Tune's storage needs it; ray.tune imports without it)
        import ray
        import ray.tune  # noqa: F401
    except ImportError as error:
        raise UserInputError(
            f"The search needs Ray Tune: pip install \"recbole-mamba[tune]\" ({error})."
        ) from None
    if not ray.__version__.startswith("2.6."):
        raise UserInputError(
            f"The search needs ray 2.6 (the version RecBole 1.2.1 pins), found ray {ray.__version__}: "
            "pip install \"ray[tune]==2.6.3\"."
        )


def _tuner(space, request, options, name, storage_path):
    """A new Tuner, or the interrupted search of that name, restored to go on where it stopped."""
    from ray import tune
    from ray.air import FailureConfig, RunConfig

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, request=request),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    experiment_dir = os.path.join(storage_path, name)
    if tune.Tuner.can_restore(experiment_dir):
        logger.warning("Resuming the search in %s", experiment_dir)
        # Finished and failed trials are kept as they were; unfinished ones start again.
        return tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(
            metric=request["metric"],
            mode=request["mode"],
            num_samples=options.num_samples,
            scheduler=_scheduler(options, request),
            search_alg=_search_algorithm(options),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=0),  # a failing trial is recorded, not retried
            verbose=1,
        ),
    )


def _interrupted(experiment_dir, expected_trials):
    """Whether the search stopped early (Ctrl+C): Tune 2.6 returns normally then too.

    Tune's saved state, which a resumed search starts from, tells: fewer trials than asked for, or
    one that neither ended nor failed.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_dir).trials
    return len(trials) < expected_trials or any(trial.status not in ("TERMINATED", "ERROR") for trial in trials)


def _check_space_against_config(space, base, space_file):
    known = base.final_config_dict
    for key in space:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UserInputError(
                f"Search space '{space_file}': '{key}' is not a setting of {base['model']} "
                f"(neither RecBole's, the plugin's nor your config's).{hint} To search a new key, "
                "give it a default in a config file."
            )
        if key in base.external_config_dict:
            raise UserInputError(
                f"Search space '{space_file}': '{key}' is both searched and fixed (by a config file or "
                f"--{key}=...): drop one of the two."
            )


def _check_options(options, space, base):
    positive = {"num_samples": options.num_samples, "grace_period": options.grace_period}
    for key, value in positive.items():
        if value < 1:
            raise UserInputError(f"--{key} must be >= 1, got {value}.")
    if options.reduction_factor < 2:
        raise UserInputError(f"--reduction_factor must be >= 2, got {options.reduction_factor}.")
    if options.cpus_per_trial <= 0 or options.gpus_per_trial < 0 or options.max_concurrent_trials < 0:
        raise UserInputError(
            "--cpus_per_trial must be > 0, --gpus_per_trial and --max_concurrent_trials >= 0; got "
            f"{options.cpus_per_trial}, {options.gpus_per_trial}, {options.max_concurrent_trials}."
        )
    if options.scheduler not in SCHEDULERS:
        raise UserInputError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {options.scheduler!r}.")
    if options.search_alg not in SEARCH_ALGORITHMS:
        raise UserInputError(
            f"--search_alg must be one of {', '.join(SEARCH_ALGORITHMS)}, got {options.search_alg!r}."
        )
    package = SEARCH_ALGORITHMS[options.search_alg]
    if package and importlib.util.find_spec(package) is None:
        raise UserInputError(f"--search_alg={options.search_alg} needs the {package} package: pip install {package}.")
    if package and uses_grid(space):
        raise UserInputError(f"--search_alg={options.search_alg} cannot search a grid: use choice instead of grid.")
    if base["eval_step"] < 1:
        raise UserInputError(f"A search needs a validation every epoch or so: eval_step must be >= 1, got {base['eval_step']}.")
    if options.scheduler == "asha":
        if "epochs" in space:
            raise UserInputError("ASHA stops trials by epoch, so 'epochs' cannot be searched with it: fix --epochs.")
        validations = base["epochs"] // base["eval_step"]
        if options.grace_period > validations:
            raise UserInputError(
                f"--grace_period ({options.grace_period}) exceeds the validations each trial runs "
                f"(epochs {base['epochs']} / eval_step {base['eval_step']} = {validations})."
            )


def _check_name(name):
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise UserInputError(f"--name must be a folder name without '/', got {name!r}.")


def _trial_request(base, options):
    """Everything a trial needs, as plain data: it runs in another process, maybe another machine."""
    fixed = {key: value for key, value in base.external_config_dict.items() if key not in TRIAL_KEYS}
    fixed.pop("model", None)
    fixed.pop("dataset", None)
    # Trials run in their own folders: a relative data_path would point elsewhere there.
    fixed["data_path"] = os.path.dirname(os.path.abspath(base["data_path"]))
    return {
        "model": base["model"],
        "dataset": base["dataset"],
        "fixed": fixed,
        "metric": "valid_" + base["valid_metric"].lower(),
        "mode": "max" if base["valid_metric_bigger"] else "min",
        "epochs": base["epochs"],
        "stopping_step": base["stopping_step"],
        "eval_step": base["eval_step"],
        "cpus_per_trial": options.cpus_per_trial,
    }


def _record_request(experiment_dir, base, space, request, options):
    """Write search.yaml; if the folder holds another search, refuse rather than mix the two."""
    asked = {
        "model": request["model"],
        "dataset": request["dataset"],
        "search_space": {key: {distribution: args} for key, (distribution, args) in space.items()},
        "fixed": request["fixed"],
        **{key: getattr(options, key) for key in ("num_samples", "scheduler", "grace_period", "reduction_factor")},
        **{key: getattr(options, key) for key in ("search_alg", "search_seed")},
    }
    asked = yaml.safe_load(yaml.safe_dump(asked))  # compare as it will read back
    path = os.path.join(experiment_dir, "search.yaml")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = yaml.safe_load(f)
        if before != asked:
            changed = sorted(key for key in set(asked) | set(before or {}) if (before or {}).get(key) != asked.get(key))
            raise UserInputError(
                f"{experiment_dir} holds a search with other settings ({', '.join(changed)} differ): "
                "resume it with the same command, or pass another --name or --storage_path."
            )
        return
    os.makedirs(experiment_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(asked, f, sort_keys=False)


def _start_ray(address):
    """Start or join Ray unless this process already did; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"worker_process_setup_hook": _numpy_aliases_hook()}
    # ray 2.6.3's workers warn that pkg_resources is deprecated, in every process they start.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:pkg_resources is deprecated:UserWarning")
    if address is None:
        ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True


def _numpy_aliases_hook():
    """What every Ray worker runs first: numpy 2 aliases that ray 2.6.3 still uses.

    A worker imports ray.tune (which reads ``np.bool8``) before it loads any trial code, so the
    plugin's own compatibility fixes come too late there. The hook is a closure, which Ray ships by
    value: a worker that runs it imports numpy only, not the plugin, torch and RecBole (trial
    workers import those anyway, and ``import recbole_mamba`` applies every fix).
    """
    aliases = dict(compat._NUMPY_ALIASES)

    def add_numpy_aliases():
        import numpy

        for name, value in aliases.items():
            if name not in vars(numpy):
                setattr(numpy, name, value)

    return add_numpy_aliases


def _scheduler(options, request):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if options.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",  # one per validation
        max_t=request["epochs"] // request["eval_step"],
        grace_period=options.grace_period,
        reduction_factor=options.reduction_factor,
    )


def _search_algorithm(options):
    # The concurrency limit is set here: TuneConfig's max_concurrent_trials is ignored (with a
    # warning) once a BasicVariantGenerator is given.
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if options.search_alg == "random":
        return BasicVariantGenerator(random_state=options.search_seed, max_concurrent=options.max_concurrent_trials)
    if options.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=options.search_seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=options.search_seed)
    if options.max_concurrent_trials:
        return ConcurrencyLimiter(searcher, max_concurrent=options.max_concurrent_trials)
    return searcher


def _trial_dirname(trial):
    return f"trial_{trial.trial_id}"


# Results ------------------------------------------------------------------------------------------


def trial_rows(results, request):
    """One dict per trial: name, searched values, best validation score, epochs, status, error, checkpoint."""
    metric = request["metric"]
    rows = []
    for result in results:
        trial_dir = result.path
        history = result.metrics_dataframe
        scores = history[metric].dropna() if history is not None and metric in history else pd.Series(dtype=float)
        if result.error is not None:
            status = "failed"
        elif len(scores) and bool(history["finished"].iloc[-1]):
            status = "completed"
        else:
            status = "stopped early"  # by the scheduler
        best = None
        if len(scores):
            best = float(scores.max() if request["mode"] == "max" else scores.min())
        rows.append(
            {
                "trial": os.path.basename(trial_dir),
                "params": _trial_params(result, trial_dir),
                "best": best,
                "epochs": int(history["epoch"].max()) if len(scores) else 0,
                "status": status,
                "error": _error_line(result.error),
                "checkpoint": _checkpoint(trial_dir),
            }
        )
    return rows


def trial_table(rows, keys, request):
    """The rows as a table, best first and failed trials last: what trials.csv holds."""
    table = pd.DataFrame(
        [
            {
                "trial": row["trial"],
                **{key: row["params"].get(key) for key in keys},
                "best_" + request["metric"]: row["best"],
                "epochs": row["epochs"],
                "status": row["status"],
                "error": row["error"],
                "checkpoint": row["checkpoint"],
            }
            for row in rows
        ]
    )
    ascending = request["mode"] == "min"
    table = table.sort_values(by="best_" + request["metric"], ascending=ascending, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _trial_params(result, trial_dir):
    if result.config:
        return plain(result.config)
    # A trial that failed before its first report has no metrics, hence no config in its Result.
    import json

    with open(os.path.join(trial_dir, "params.json"), encoding="utf-8") as f:
        return json.load(f)


def _error_line(error):
    """The trial's exception as one line: its type and message, without Ray's traceback."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


# RecBole names the best model's checkpoint '<model>-<%b-%d-%Y_%H-%M-%S>.pth'; other files may sit
# beside it (a resumable '-last.pth', a '.tmp-' file of an interrupted save).
_BEST_MODEL_FILE = re.compile(r"^\w+-[^-]+-\d{2}-\d{4}_\d{2}-\d{2}-\d{2}\.pth$")


def _checkpoint(trial_dir):
    """The best model's checkpoint in a trial's folder ('' if it saved none)."""
    folder = os.path.join(trial_dir, "saved")
    files = sorted(f for f in os.listdir(folder) if _BEST_MODEL_FILE.match(f)) if os.path.isdir(folder) else []
    return os.path.join(folder, files[-1]) if files else ""


def _write_best_config(experiment_dir, base, request, best_params, best, name):
    path = os.path.join(experiment_dir, "best_config.yaml")
    settings = {"model": request["model"], "dataset": request["dataset"], **request["fixed"], **best_params}
    header = (
        f"# Best trial of the search '{name}' ({best['trial']}), chosen on validation "
        f"{base['valid_metric']} = {best['best']:.4f}.\n"
        f"# Searched: {', '.join(best_params)}. Run it:\n"
        f"#   python run_recbole_mamba.py --config_files={path}\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(settings, f, sort_keys=False)
    return path


def evaluate_checkpoint(model_file):
    """Validation and test metrics of a saved model, by RecBole's full-ranking evaluation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # RecBole's Trainer writes log_tensorboard/ into the working directory: keep it out of the user's.
    with tempfile.TemporaryDirectory() as scratch, _working_directory(scratch):
        config, model, _, _, valid_data, test_data = load_data_and_model(model_file, map_location=torch.device(device))
        trainer = get_trainer(config)(config, model)
        valid_result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    return dict(valid_result), dict(test_result)


@contextlib.contextmanager
def _working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _floats(result):
    return {key: float(value) for key, value in result.items()}


# Command line -------------------------------------------------------------------------------------


def option_parser():
    defaults = SearchOptions()
    parser = argparse.ArgumentParser(prog="run_recbole_mamba.py --tune=SPACE.yaml", allow_abbrev=False)
    add = parser.add_argument
    add("--num_samples", type=int, default=defaults.num_samples, help="trials (times the grid's size)")
    add("--scheduler", choices=SCHEDULERS, default=defaults.scheduler)
    add("--grace_period", type=int, default=defaults.grace_period, help="ASHA: validations before a trial can be stopped")
    add("--reduction_factor", type=int, default=defaults.reduction_factor, help="ASHA: keep 1/N of trials per rung")
    add("--search_alg", choices=list(SEARCH_ALGORITHMS), default=defaults.search_alg)
    add("--search_seed", type=int, default=defaults.search_seed, help="seed of the search algorithm's sampling")
    add("--cpus_per_trial", type=float, default=defaults.cpus_per_trial)
    add("--gpus_per_trial", type=float, default=defaults.gpus_per_trial)
    add("--max_concurrent_trials", type=int, default=defaults.max_concurrent_trials, help="0: as resources allow")
    add("--ray_address", default=defaults.ray_address, help="join this Ray cluster (e.g. auto) instead of starting Ray")
    add("--storage_path", default=defaults.storage_path, help="where searches are written and resumed")
    add("--name", default=defaults.name, help="the search's folder under storage_path (default: MODEL-DATASET)")
    return parser


def main(model, dataset, config_file_list, space_file, argv):
    """The ``--tune`` command line: search options from ``argv``, the rest are fixed RecBole settings.

    Raises ``UserInputError`` for bad input; returns the exit status otherwise.
    """
    known, settings = option_parser().parse_known_args(argv)
    options = SearchOptions(**vars(known))
    try:
        result = search(model, dataset, space_file, config_file_list, settings, options)
    except SearchFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except SearchInterrupted as error:
        print(str(error), file=sys.stderr)
        return 130  # as a shell reports a command ended by Ctrl+C
    print_summary(result)
    return 0


def print_summary(result):
    shown = result.table.drop(columns=["checkpoint"])
    print(f"\nTrials (best first), also in {result.experiment_dir}/trials.csv:")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nBest trial: {result.best_trial}: {result.best_params}")
    print(f"Best configuration: {result.best_config_file}")
    print(format_results(result.valid_result, result.test_result, result.valid_metric), flush=True)
