"""RecBole 1.2.1 on today's stack (numpy 2, torch >= 2.6): the only module that patches RecBole.

RecBole 1.2.1 was released for numpy 1 and torch < 2.6. Each fix below is small, named after
what it repairs, and applied once by :func:`apply` (``import recbole_mamba`` calls it, so every
process that imports the plugin, a Ray worker included, gets it).

1. ``Config.compatibility_settings`` assigns ``np.float_``, ``np.complex_`` and ``np.unicode_``,
   which numpy 2 removed: replaced by the same aliases built from names numpy 2 still has.
   RecBole's own code still uses ``np.float`` (``Dataset._fill_nan``), so the aliases must exist.
   ``np.bool8`` is added for ray 2.6.3 (RecBole's pinned ray), which still uses it.
2. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and RecBole's checkpoints
   pickle the whole ``Config``. Instead of switching that safety off, exactly the classes a RecBole
   checkpoint holds are registered with ``torch.serialization.add_safe_globals`` (see
   :func:`allow_checkpoint_classes`). Anything else in a checkpoint is still refused. RecBole saves
   with ``pickle_protocol=4``, whose opcodes the weights-only unpickler cannot read at all, so
   ``Trainer._save_checkpoint`` saves with torch's default protocol instead, through a temporary
   file renamed into place, so that a run killed while saving never leaves a truncated checkpoint.
   RecBole's own loads (``Trainer.evaluate`` reloading the best model, ``Trainer.resume_checkpoint``)
   go through :func:`recbole_mamba.checkpoint.load_checkpoint`, which also refuses a pickle that
   calls an allowed class, and honours the ``trust_checkpoint`` setting.
3. ``Dataset._download`` calls ``torch.distributed.barrier()`` even in a single process, which
   raises there, and leaves a half-downloaded archive or dataset folder behind when the download
   fails, which later runs then trust. A single process now downloads with
   :func:`recbole_mamba.data.download.download_dataset` (everything in a temporary folder, renamed
   into place only when complete); with a process group, RecBole's own code runs.
4. pandas 3 (copy-on-write) silently ignores RecBole's chained in-place ``df[field].fillna(...,
   inplace=True)``: missing token and float values stay NaN, and empty token_seq cells crash the
   sequence split. ``Dataset._fill_nan`` is replaced by the same logic written as assignments, and
   under pandas 3 the ``read_csv`` that ``Dataset._load_feat`` calls fills empty sequence cells with
   ``""`` itself, which is what RecBole's ignored ``fillna`` meant to do. pandas 3 also made
   ``Series.agg(len)`` the length of the whole Series instead of each cell's, which RecBole uses to
   split token_seq and float_seq fields back into rows after remapping, normalising or bucketing:
   while those three methods run, ``agg(len)`` keeps its pandas 2 meaning. Works on pandas 2 and 3.
5. Importing RecBole's sequential models switches autograd's anomaly detection on for the whole
   process (``sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)``
   at import), and ``recbole.utils.get_model`` imports them for any sequential model. Anomaly
   mode checks every gradient for NaN with a host-device sync: on an H100 it made a Mamba4Rec
   epoch on ml-1m 1.4x slower. The package is imported once here, and the anomaly setting the
   process had before is put back.
"""

import os
import tempfile
import warnings

import numpy as np
import torch

_applied = False


def apply():
    """Apply every fix once; safe to call many times."""
    global _applied
    if _applied:
        return
    _add_numpy_aliases()
    _patch_config_compatibility_settings()
    _patch_download()
    _patch_save_checkpoint()
    _patch_checkpoint_loading()
    _patch_fill_nan()
    _patch_sequence_cells_for_pandas_3()
    _patch_cellwise_len_for_pandas_3()
    allow_checkpoint_classes()
    _quiet_recbole_deprecation_warnings()
    _import_sequential_models_without_anomaly_mode()
    _applied = True


# 1. numpy 2 ------------------------------------------------------------------------------------

_NUMPY_ALIASES = {
    # name RecBole (or ray 2.6.3) uses -> what numpy 1 gave it
    "bool": np.bool_,
    "bool8": np.bool_,
    "int": np.int_,
    "long": np.int_,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "unicode": np.str_,
}


def _add_numpy_aliases():
    for name, value in _NUMPY_ALIASES.items():
        if name not in vars(np):  # hasattr would trigger numpy's deprecation warnings
            setattr(np, name, value)


def _patch_config_compatibility_settings():
    from recbole.config.configurator import Config

    # RecBole calls this at the start of every Config(); the original fails on numpy 2.
    Config.compatibility_settings = lambda self: _add_numpy_aliases()


# 2. torch.load(weights_only=True) ----------------------------------------------------------------


def checkpoint_classes():
    """The classes (besides tensors and builtins) that a RecBole checkpoint pickles."""
    import yaml
    from recbole.config.configurator import Config
    from recbole.utils import enum_type

    from recbole_mamba.config import Config as PluginConfig

    enums = [
        getattr(enum_type, name)
        for name in ("ModelType", "InputType", "EvaluatorType", "FeatureType", "FeatureSource")
    ]
    # Config keeps its YAML loader class (``Config.yaml_loader = yaml.FullLoader``).
    return [Config, PluginConfig, yaml.FullLoader, *enums]


def allow_checkpoint_classes(extra=()):
    """Let ``torch.load(weights_only=True)`` read RecBole checkpoints.

    ``extra`` are further classes a checkpoint refers to: the model class, which RecBole's
    ``Config`` keeps as ``config.model_class``. Only these classes are registered; a checkpoint that
    names anything else is still refused.
    """
    torch.serialization.add_safe_globals([*checkpoint_classes(), *extra])


def _patch_save_checkpoint():
    from recbole.trainer.trainer import Trainer
    from recbole.utils import set_color

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        save_atomically(checkpoint_state(self, epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    Trainer._save_checkpoint = _save_checkpoint


def checkpoint_state(trainer, epoch):
    """The entries of RecBole's own checkpoint, in types the weights-only unpickler accepts."""
    return {
        "config": trainer.config,
        "epoch": epoch,
        "cur_step": trainer.cur_step,
        # RecBole's score is a numpy scalar, which the weights-only unpickler refuses.
        "best_valid_score": float(trainer.best_valid_score),
        "state_dict": trainer.model.state_dict(),
        "other_parameter": trainer.model.other_parameter(),
        "optimizer": trainer.optimizer.state_dict(),
    }


def save_atomically(obj, path):
    """``torch.save`` to ``path`` via a temporary file in the same folder, then rename.

    A reader (or a run resumed after a crash) sees either the previous complete file or the new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _patch_checkpoint_loading():
    from recbole.trainer.trainer import Trainer

    original_evaluate = Trainer.evaluate

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        # RecBole's own steps, with the best model read by the safe loader instead of torch.load.
        if load_best_model and eval_data:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = _load(checkpoint_file, self.device, self.config)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return original_evaluate(self, eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        restore_checkpoint(self, _load(resume_file, self.device, self.config))
        self.saved_model_file = str(resume_file)  # as RecBole: the resumed file becomes the best-model file
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    Trainer.evaluate = evaluate
    Trainer.resume_checkpoint = resume_checkpoint


def restore_checkpoint(trainer, checkpoint):
    """RecBole's resume steps on an already loaded checkpoint: counters, best score, model, optimizer."""
    trainer.start_epoch = checkpoint["epoch"] + 1
    trainer.cur_step = checkpoint["cur_step"]
    trainer.best_valid_score = checkpoint["best_valid_score"]
    if checkpoint["config"]["model"].lower() != trainer.config["model"].lower():
        trainer.logger.warning(
            "Architecture configuration given in config file is different from that of checkpoint. "
            "This may yield an exception while state_dict is being loaded."
        )
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])


def _load(path, device, config):
    from recbole_mamba.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location=device, trust=bool(config["trust_checkpoint"]))


# 3. single-process download ----------------------------------------------------------------------


def _patch_download():
    from recbole.data.dataset import dataset as dataset_module

    original_download = dataset_module.Dataset._download

    def _download(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return original_download(self)
        from recbole_mamba.data.checks import check_atomic_files
        from recbole_mamba.data.download import download_dataset

        url = self._get_download_url("url")
        self.logger.info(f"Prepare to download dataset [{self.dataset_name}] from [{url}].")
        download_dataset(
            url, self.dataset_path, self.dataset_name, self.logger,
            check=lambda folder: check_atomic_files(self.config, folder),
        )

    dataset_module.Dataset._download = _download


def _quiet_recbole_deprecation_warnings():
    # RecBole's own calls of APIs that pandas and torch deprecated (chained in-place fillna,
    # torch.cuda.amp.GradScaler) warn on every run; users cannot act on them.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    # ray 2.6.3 (imported by recbole.quick_start) warns that pkg_resources is deprecated.
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
    # pandas 3 warns about the chained in-place fillna that item 4 below makes unnecessary.
    warnings.filterwarnings("ignore", message=r"A value is being set on a copy", module=r"recbole\.")


# 5. anomaly detection -----------------------------------------------------------------------------


def _import_sequential_models_without_anomaly_mode():
    enabled = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (sine.py switches anomaly mode on)

    torch.autograd.set_detect_anomaly(enabled)


# 4. pandas 3 --------------------------------------------------------------------------------------


def _patch_fill_nan():
    from recbole.data.dataset.dataset import Dataset
    from recbole.utils import FeatureType, set_color

    def _fill_nan(self):
        # RecBole's own imputation (token: 0 = [PAD], float: the column mean, sequences: empty
        # arrays), assigning the results instead of chaining in-place fillna, which pandas 3 ignores.
        self.logger.debug(set_color("Filling nan", "green"))
        for feat_name in self.feat_name_list:
            feat = getattr(self, feat_name)
            for field in feat:
                ftype = self.field2type[field]
                if ftype == FeatureType.TOKEN:
                    feat[field] = feat[field].fillna(value=0)
                elif ftype == FeatureType.FLOAT:
                    feat[field] = feat[field].fillna(value=feat[field].mean())
                else:
                    dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                    feat[field] = feat[field].apply(
                        lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                    )

    Dataset._fill_nan = _fill_nan


class _PandasFillingSequenceCells:
    """The pandas module, except that ``read_csv`` turns empty ``*_seq`` cells into ``""``.

    Stands in for ``pd`` inside RecBole's dataset module under pandas 3 only, where RecBole's own
    ``df[field].fillna(value="", inplace=True)`` after reading is a silent no-op.
    """

    def __init__(self, pandas_module):
        self._pandas = pandas_module

    def __getattr__(self, name):
        return getattr(self._pandas, name)

    def read_csv(self, *args, **kwargs):
        df = self._pandas.read_csv(*args, **kwargs)
        for column in df.columns:  # still named "field:type" here
            if str(column).endswith("_seq"):
                df[column] = df[column].fillna("")
        return df


def pandas_major_version():
    import pandas

    return int(pandas.__version__.split(".")[0])


def _patch_sequence_cells_for_pandas_3():
    if pandas_major_version() < 3:
        return
    from recbole.data.dataset import dataset as dataset_module

    if not isinstance(dataset_module.pd, _PandasFillingSequenceCells):
        dataset_module.pd = _PandasFillingSequenceCells(dataset_module.pd)


def _cellwise_len_agg(original_agg):
    def agg(series, func=None, *args, **kwargs):
        if func is len:  # pandas 2: the length of each cell
            return series.map(len)
        return original_agg(series, func, *args, **kwargs)

    return agg


def _patch_cellwise_len_for_pandas_3():
    if pandas_major_version() < 3:
        return
    import functools

    import pandas
    from recbole.data.dataset.dataset import Dataset

    def with_cellwise_len(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            original = pandas.Series.agg
            pandas.Series.agg = _cellwise_len_agg(original)
            try:
                return method(*args, **kwargs)
            finally:
                pandas.Series.agg = original

        return wrapper

    for name in ("_remap", "_normalize", "_discretization"):
        setattr(Dataset, name, with_cellwise_len(getattr(Dataset, name)))
