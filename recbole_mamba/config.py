"""Configuration: find a model by name, load the plugin's yaml/ defaults, reject bad values early.

Settings are merged in RecBole's order, lowest priority first:

1. RecBole's own defaults (``recbole/properties``: overall, model, dataset, quick-start presets);
2. the plugin's ``yaml/overall.yaml`` (the evaluation protocol every model here is compared under),
   ``yaml/model/<Model>.yaml`` and ``yaml/dataset/<dataset>.yaml``;
3. the user's config files, then ``config_dict``, then command-line ``--key=value`` pairs.

Unlike RecBole's ``Config``, this one never reads ``sys.argv`` by itself: command-line pairs are
passed in explicitly (``cmd_args``), so building a config inside a Ray worker or a notebook does not
absorb somebody else's arguments.
"""

import difflib
import importlib
import importlib.util
import os
from pathlib import Path

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import InputType, ModelType

from recbole_mamba import compat
from recbole_mamba.data.preparation import SEQUENCE_STORAGES, TRAIN_MODES
from recbole_mamba.errors import UserInputError, is_int
from recbole_mamba.trainer import amp_dtype

# Plugin models: name -> module that defines a class of that name.
PLUGIN_MODELS = {
    "Mamba4Rec": "recbole_mamba.model.mamba4rec",
    "RecMamba": "recbole_mamba.model.recmamba",
    "SASRecAllPositions": "recbole_mamba.model.sasrec_all_positions",
}

# Losses of the plugin's models whose negatives the model draws itself (not RecBole's dataloader).
MODEL_SAMPLED_LOSSES = ("BCE", "SampledSoftmax")

# RecBole's model packages that import without optional libraries (exlib needs lightgbm/xgboost).
_RECBOLE_MODEL_PACKAGES = (
    "recbole.model.sequential_recommender",
    "recbole.model.general_recommender",
    "recbole.model.context_aware_recommender",
    "recbole.model.knowledge_aware_recommender",
)


def yaml_dir():
    """The plugin's ``yaml/`` folder: beside the package in a checkout, inside it when installed."""
    source_tree = Path(__file__).resolve().parent.parent / "yaml"
    if source_tree.is_dir():
        return source_tree
    return Path(__file__).resolve().parent / "yaml"


def _recbole_model_modules():
    """Lower-case module names of RecBole's models, without importing them."""
    import pkgutil

    names = {}
    for package in _RECBOLE_MODEL_PACKAGES:
        spec = importlib.util.find_spec(package)
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            names.setdefault(info.name, package)
    return names


def model_names():
    """Every model name this plugin can run: its own, then RecBole's (exlib models excepted)."""
    names = list(PLUGIN_MODELS)
    for package in _RECBOLE_MODEL_PACKAGES:
        module = importlib.import_module(package)
        names += [
            name
            for name, value in vars(module).items()
            if isinstance(value, type) and hasattr(value, "type") and name not in names
        ]
    return names


def get_model(model_name):
    """Return the model class called ``model_name`` (case-insensitive): the plugin's first, then RecBole's."""
    if not isinstance(model_name, str) or not model_name:
        raise UserInputError(f"The model name must be a non-empty string, got {model_name!r}.")
    for name, module_path in PLUGIN_MODELS.items():
        if name.lower() == model_name.lower():
            return getattr(importlib.import_module(module_path), name)
    package = _recbole_model_modules().get(model_name.lower())
    if package is not None:
        module = importlib.import_module(f"{package}.{model_name.lower()}")
        for name, value in vars(module).items():
            if name.lower() == model_name.lower() and isinstance(value, type):
                return value
    by_lower_name = {name.lower(): name for name in model_names()}
    close = difflib.get_close_matches(model_name.lower(), by_lower_name, n=5, cutoff=0.6)
    close = [by_lower_name[name] for name in close]
    hint = f" Close matches: {', '.join(close[:5])}." if close else ""
    raise UserInputError(
        f"Unknown model '{model_name}'.{hint} Plugin models: {', '.join(PLUGIN_MODELS)}; "
        "any RecBole model name (e.g. SASRec, BERT4Rec, GRU4Rec) also works."
    )


def _read_yaml_mapping(path, loader):
    """Read a YAML file that must hold a mapping; a clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.load(f.read(), Loader=loader)
    except OSError as e:
        raise UserInputError(f"Cannot read config file '{path}': {e.strerror}.") from None
    except UnicodeDecodeError:
        raise UserInputError(f"Config file '{path}' is not UTF-8 text.") from None
    except yaml.YAMLError as e:
        raise UserInputError(f"Config file '{path}' is not valid YAML: {e}".rstrip(".") + ".") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserInputError(
            f"Config file '{path}' must hold 'key: value' lines (a YAML mapping), "
            f"but it holds a {type(content).__name__}."
        )
    return content


def parse_cmd_args(args):
    """``['--epochs=5', ...]`` -> ``{'epochs': '5', ...}``; values are typed later by RecBole's rules."""
    parsed = {}
    for arg in args:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            raise UserInputError(
                f"Cannot read the argument '{arg}': settings are given as --key=value, "
                "e.g. --epochs=5 or --data_path=/path/to/datasets."
            )
        if key in parsed and parsed[key] != value:
            raise UserInputError(f"The setting '{key}' is given twice with different values.")
        parsed[key] = value
    return parsed


class Config(RecBoleConfig):
    """RecBole's ``Config`` that also knows the plugin's models and yaml/ defaults.

    Args:
        model: a model name (plugin or RecBole) or a model class.
        dataset: a dataset name.
        config_file_list: YAML files with settings.
        config_dict: settings as a dict.
        cmd_args: ``--key=value`` strings, highest priority (the CLI passes its own arguments here).
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=()):
        self._cmd_args = list(cmd_args)
        super().__init__(model, dataset, config_file_list, config_dict)
        self._check_values()
        # RecBole's Trainer reloads its checkpoints, which name the model class, with
        # torch.load(weights_only=True): allow that one class too.
        compat.allow_checkpoint_classes([self.model_class])

    def _load_config_files(self, file_list):
        settings = {}
        for path in file_list or []:
            settings.update(_read_yaml_mapping(path, self.yaml_loader))
        return settings

    def _load_cmd_line(self):
        return self._convert_config_dict(parse_cmd_args(self._cmd_args))

    def _get_model_and_dataset(self, model, dataset):
        model = model if model is not None else self.external_config_dict.get("model")
        dataset = dataset if dataset is not None else self.external_config_dict.get("dataset")
        if model is None:
            raise UserInputError("No model given: pass --model=NAME (e.g. --model=Mamba4Rec).")
        if dataset is None:
            raise UserInputError("No dataset given: pass --dataset=NAME (e.g. --dataset=ml-100k).")
        model_class = get_model(model) if isinstance(model, str) else model
        return model_class.__name__, model_class, str(dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        plugin_yaml = yaml_dir()
        for path in (
            plugin_yaml / "overall.yaml",
            plugin_yaml / "model" / f"{model}.yaml",
            plugin_yaml / "dataset" / f"{dataset}.yaml",
        ):
            if path.is_file():
                self.internal_config_dict.update(_read_yaml_mapping(path, self.yaml_loader))
        self._default_train_negatives()

    def _default_train_negatives(self):
        # RecBole's default samples one negative per positive, which it then rejects for the CE loss
        # every sequential model here uses by default: let RecBole's dataloader sample negatives only
        # for the losses that take them from it. The plugin's sampled losses, and every loss in
        # all_positions mode, draw their negatives inside the model.
        if "train_neg_sample_args" in self.external_config_dict:
            return
        merged = {**self.internal_config_dict, **self.external_config_dict}
        if merged.get("loss_type") in ("CE", *MODEL_SAMPLED_LOSSES) or merged.get("train_mode") == "all_positions":
            self.internal_config_dict["train_neg_sample_args"] = None

    def _set_default_parameters(self):
        super()._set_default_parameters()
        # RecBole derives the input type from loss_type for CE and BPR only; the plugin's sampled
        # losses read single interactions like CE (their negatives come from the model, not RecBole).
        if self.final_config_dict.get("loss_type") in MODEL_SAMPLED_LOSSES:
            self.final_config_dict.setdefault("MODEL_INPUT_TYPE", InputType.POINTWISE)
        # RecBole always reads ml-100k from the copy inside its package; honour an explicit data_path
        # that holds an ml-100k folder, so the embedded default and a full copy can both be used.
        user_data_path = self.external_config_dict.get("data_path")
        if self.dataset == "ml-100k" and user_data_path:
            candidate = os.path.join(user_data_path, self.dataset)
            if os.path.isdir(candidate):
                self.final_config_dict["data_path"] = candidate

    def _check_values(self):
        if self.final_config_dict["MODEL_TYPE"] == ModelType.SEQUENTIAL:
            length = self.final_config_dict.get("MAX_ITEM_LIST_LENGTH")
            if not is_int(length) or length < 2:
                raise UserInputError(
                    f"MAX_ITEM_LIST_LENGTH must be an integer >= 2 (the history length a model sees), "
                    f"got {length!r}."
                )
        amp_dtype(self)  # raises on a dtype autocast cannot use
        prefetch = self.final_config_dict.get("prefetch_batches")
        if prefetch is not None and (not is_int(prefetch) or prefetch < 0):
            raise UserInputError(
                f"prefetch_batches must be an integer >= 0 (training batches built ahead on a CUDA "
                f"device; 0 builds each one when it is needed), got {prefetch!r}."
            )
        self._check_train_mode()
        self._check_sequence_storage()
        check = getattr(self.model_class, "check_config", None)
        if check is not None:
            check(self)

    def _check_train_mode(self):
        mode = self.final_config_dict.get("train_mode")
        if mode not in TRAIN_MODES:
            raise UserInputError(f"train_mode must be one of {', '.join(TRAIN_MODES)}, got {mode!r}.")
        stride = self.final_config_dict.get("window_stride")
        if mode == "prefix":
            if stride is not None:
                raise UserInputError(
                    f"window_stride (got {stride!r}) sets how far apart the windows of "
                    "train_mode=all_positions are cut; train_mode=prefix has no windows: "
                    "leave window_stride empty, or use train_mode=all_positions."
                )
            return
        max_len = self.final_config_dict.get("MAX_ITEM_LIST_LENGTH")
        if stride is not None and (not is_int(stride) or not 1 <= stride <= max_len):
            raise UserInputError(
                f"window_stride must be empty (windows do not overlap) or an integer in "
                f"1..MAX_ITEM_LIST_LENGTH (1..{max_len}), got {stride!r}."
            )
        if not getattr(self.model_class, "supports_all_positions", False):
            raise UserInputError(
                f"train_mode=all_positions needs a model that predicts the next item at every position; "
                f"{self.model} does not support it (models that do: {', '.join(all_position_models())}). "
                "Use train_mode=prefix (RecBole's training) for it."
            )
        if self.final_config_dict.get("benchmark_filename") is not None:
            raise UserInputError(
                "train_mode=all_positions cuts its windows from RecBole's own split, so it cannot be "
                "used with benchmark_filename (pre-split files); use train_mode=prefix."
            )
        if self.final_config_dict["train_neg_sample_args"].get("distribution") != "none":
            raise UserInputError(
                "train_mode=all_positions draws negatives inside the model (negative_sampling, "
                "num_negatives): remove train_neg_sample_args, or use train_mode=prefix."
            )


    def _check_sequence_storage(self):
        storage = self.final_config_dict.get("sequence_storage")
        if storage not in SEQUENCE_STORAGES:
            raise UserInputError(
                f"sequence_storage must be one of {', '.join(SEQUENCE_STORAGES)}, got {storage!r} "
                "(prefix: RecBole's table of every target's history; flat: each user's history once)."
            )
        if storage == "prefix":
            return
        if self.final_config_dict["MODEL_TYPE"] != ModelType.SEQUENTIAL:
            raise UserInputError(
                f"sequence_storage=flat stores the histories of sequential models; {self.model} is not "
                "one: leave sequence_storage at prefix."
            )
        if self.final_config_dict.get("benchmark_filename") is not None:
            raise UserInputError(
                "sequence_storage=flat builds the histories from the interactions, so it cannot read "
                "pre-split files with their own histories (benchmark_filename); use sequence_storage=prefix."
            )


def add_missing_defaults(config):
    """Give a checkpoint's config the plugin's yaml/ defaults for keys it lacks.

    A checkpoint stores its run's whole Config; one written before a key was added (``train_mode``,
    ``negative_sampling``, ...) would otherwise read that key as None.
    """
    plugin_yaml = yaml_dir()
    for path in (plugin_yaml / "overall.yaml", plugin_yaml / "model" / f"{config['model']}.yaml"):
        if path.is_file():
            for key, value in _read_yaml_mapping(path, config.yaml_loader).items():
                config.final_config_dict.setdefault(key, value)
    return config


def all_position_models():
    """Names of the plugin's models that support ``train_mode: all_positions``."""
    return [name for name in PLUGIN_MODELS if getattr(get_model(name), "supports_all_positions", False)]
