"""RecBole's Trainer with what the plugin adds to it, and the choice of trainer for a model.

It adds three things. First, mixed precision in bfloat16: RecBole's ``enable_amp`` autocasts to the
device's default dtype (float16 on CUDA, which needs a loss scaler); ``amp_dtype: bfloat16``
autocasts to bfloat16 instead, which does not. The parameters (the SSM's included) stay in float32.

Second, training that survives a crash. RecBole keeps one checkpoint per run, written when
the validation score improves, and its ``resume_checkpoint`` restores the model, the optimizer and
the epoch counters, but not the random number generators or the order in which the dataloaders
shuffle. A run resumed from it therefore continues differently from the run that was interrupted,
and loses every epoch after the best one.

:class:`ResumableTraining` (mixed into the plugin's :class:`Trainer`) adds:

- ``<best-model file>-last.pth``, written atomically at the end of every epoch (after its validation
  and early-stopping step), holding RecBole's checkpoint entries plus the best validation result,
  the best-model file's path, the python / numpy / torch (and CUDA) random states and the
  generator states of the train and validation dataloaders;
- ``resume_checkpoint(last_file)``, which restores all of that, so that a run killed at any point
  and resumed ends with exactly the metrics of a run that was never interrupted (on the same
  machine, with the same settings).

Third, a training loop without host-device syncs per batch (:class:`SyncFreeTrainLoop`). RecBole's
loop reads every batch's loss (``loss.item()``) and checks it for NaN before the backward pass: two
waits for the GPU per batch, during which it cannot queue the next kernels. For small, fast batches
(all-position training) the GPU then idles while Python launches the backward pass. The plugin's loop
adds the losses up on the device and checks for NaN every ``nan_check_every`` batches (and at the end of
the epoch), with RecBole's error; everything else (order of operations, gradient clipping, loss
scaling, the returned epoch loss) is RecBole's. On a CUDA device it also builds the next
``prefetch_batches`` batches in a background thread while the GPU trains on the current one
(:mod:`recbole_mamba.data.prefetch`).

RecBole's model-specific trainers (pre-training, knowledge graphs, ...) are used as they are; they
resume as RecBole does.
"""

import contextlib
import logging
import os
import random

import numpy as np
import torch
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_gpu_usage, set_color
from recbole.utils import get_trainer as recbole_get_trainer
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_mamba import compat
from recbole_mamba.checkpoint import CheckpointError, load_checkpoint
from recbole_mamba.data.prefetch import BatchPrefetcher
from recbole_mamba.errors import UserInputError

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAST_SUFFIX = "-last.pth"
# Settings that may differ between the interrupted run and its resumption without changing it.
_SETTINGS_FREE_ON_RESUME = {"resume", "trust_checkpoint", "epochs", "checkpoint_dir", "show_progress", "state"}


def amp_dtype(config):
    """The autocast dtype ``config["amp_dtype"]`` names; None (unset) keeps the device's default."""
    name = config["amp_dtype"] if "amp_dtype" in config else None
    if name is None:
        return None
    if name not in AMP_DTYPES:
        raise UserInputError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)} (or unset), got {name!r}.")
    return AMP_DTYPES[name]


@contextlib.contextmanager
def default_autocast_dtype(device_type, dtype):
    """Make ``torch.autocast(device_type)`` without a dtype (as RecBole calls it) use ``dtype``."""
    if dtype is None:
        yield
        return
    previous = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, previous)


def last_checkpoint_path(best_model_file):
    """``saved/Mamba4Rec-<time>.pth`` -> ``saved/Mamba4Rec-<time>-last.pth``."""
    stem = best_model_file[: -len(".pth")] if best_model_file.endswith(".pth") else best_model_file
    return stem + LAST_SUFFIX


class ResumableTraining:
    """Mixin for a RecBole ``Trainer``: the resumable '-last.pth' checkpoint (see the module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.last_model_file = last_checkpoint_path(self.saved_model_file)
        self._loaders = {}
        self._restore_on_fit = None  # random and dataloader states read by resume_checkpoint
        self._last_epoch_trained = None
        self._saving = True

    # Writing -------------------------------------------------------------------------------------

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        # Everything of the previous epoch (training, validation, early stopping, best model) is
        # done when the next one starts, and nothing random happens in between: save it now.
        if self._last_epoch_trained is not None:
            self._save_last_checkpoint(self._last_epoch_trained)
        self._last_epoch_trained = epoch_idx
        return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    def _save_last_checkpoint(self, epoch):
        if not self._saving or (not self.config["single_spec"] and self.config["local_rank"] != 0):
            return
        state = compat.checkpoint_state(self, epoch)
        state["resume"] = {
            "best_valid_result": _plain_floats(self.best_valid_result),
            "best_model_file": os.path.abspath(self.saved_model_file),  # resumable from any folder
            "random_states": _random_states(),
            "loader_generators": {
                name: loader.generator.get_state() for name, loader in self._loaders.items()
            },
        }
        compat.save_atomically(state, self.last_model_file)
        self.logger.info(set_color("Saved resumable state of epoch", "blue") + f" {epoch}: {self.last_model_file}")

    # Resuming ------------------------------------------------------------------------------------

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = read_resume_checkpoint(resume_file, self.config, map_location=self.device)
        compat.restore_checkpoint(self, checkpoint)
        resume = checkpoint["resume"]
        self.best_valid_result = resume["best_valid_result"]
        self.saved_model_file = resume["best_model_file"]
        self.last_model_file = resume_file
        self._restore_on_fit = resume
        self.logger.info(
            f"Resuming from {resume_file}: epochs 0 to {checkpoint['epoch']} are done; the best model "
            f"so far is in {self.saved_model_file}."
        )

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._saving = saved
        self._loaders = {
            name: loader
            for name, loader in (("train", train_data), ("valid", valid_data))
            if getattr(loader, "generator", None) is not None
        }
        if self._restore_on_fit is not None:
            self._restore_states(self._restore_on_fit)
            self._restore_on_fit = None
            if self.start_epoch >= self.epochs or self.cur_step > self.stopping_step:
                # Training had ended (all epochs, or early stopping): RecBole's fit would overwrite
                # the best model with the current one here.
                self.logger.info("The resumed run had finished training; nothing left to train.")
                return self.best_valid_score, self.best_valid_result
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if self._last_epoch_trained is not None:
            self._save_last_checkpoint(self._last_epoch_trained)
        return result

    def _restore_states(self, resume):
        _set_random_states(resume["random_states"])
        for name, state in resume["loader_generators"].items():
            if name in self._loaders:
                self._loaders[name].generator.set_state(state)


def read_resume_checkpoint(path, config, map_location="cpu"):
    """Load a '-last.pth' checkpoint and check that it can continue the run ``config`` describes."""
    checkpoint = load_checkpoint(path, map_location=map_location, trust=bool(config["trust_checkpoint"]))
    if not isinstance(checkpoint, dict) or "resume" not in checkpoint:
        raise CheckpointError(
            f"Checkpoint '{path}' cannot resume a run: it is a best-model checkpoint, not the "
            f"'{LAST_SUFFIX}' file written after every epoch (pass that file to --resume)."
        )
    saved = checkpoint["config"]
    for key in ("model", "dataset"):
        if str(saved[key]) != str(config[key]):
            raise UserInputError(
                f"Checkpoint '{path}' was written by a run of {key} '{saved[key]}', not '{config[key]}': "
                f"resume with --{key}={saved[key]}."
            )
    best_file = checkpoint["resume"]["best_model_file"]
    if checkpoint["resume"]["best_valid_result"] is not None and not os.path.isfile(best_file):
        raise CheckpointError(
            f"Checkpoint '{path}' continues a run whose best model was saved in '{best_file}', "
            "which no longer exists; the run's result could not be evaluated."
        )
    differing = sorted(
        key
        for key in set(saved.final_config_dict) | set(config.final_config_dict)
        if key not in _SETTINGS_FREE_ON_RESUME and str(saved[key]) != str(config[key])
    )
    if differing:
        logging.getLogger().warning(
            f"Resuming from '{path}' with settings that differ from the interrupted run: "
            + ", ".join(f"{key}: {saved[key]!r} -> {config[key]!r}" for key in differing)
        )
    return checkpoint


class SyncFreeTrainLoop:
    """Mixin for a RecBole ``Trainer``: ``_train_epoch`` without a host-device sync per batch
    (see the module docstring). Distributed training keeps RecBole's loop."""

    nan_check_every = 50  # batches between NaN checks: one sync each

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if not self.config["single_spec"]:
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        batches = train_data
        depth = self.config["prefetch_batches"] if "prefetch_batches" in self.config else None
        if depth and self.device.type == "cuda":
            batches = BatchPrefetcher(train_data, self.device, depth)
        iter_data = (
            tqdm(batches, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress else batches
        )
        scaler = torch.amp.GradScaler(enabled=self.enable_scaler)
        total, parts = None, None  # sums on the device: the loss, and each part of a tuple loss
        try:
            for batch_idx, interaction in enumerate(iter_data):
                total, parts = self._train_batch(interaction, batch_idx, loss_func, scaler, total, parts)
                if self.gpu_available and show_progress:
                    iter_data.set_postfix_str(set_color("GPU RAM: " + get_gpu_usage(self.device), "yellow"))
        except Exception as error:
            # A NaN loss not yet checked makes NaN parameters, and the error they cause later
            # (e.g. in the selective scan) would hide the cause: report the NaN first.
            if total is not None and bool(torch.isnan(total)):
                raise ValueError("Training loss is nan") from error
            raise
        if total is None:
            return None
        self._check_nan(total)  # a NaN in any batch makes the sum NaN
        return tuple(float(part) for part in parts) if parts is not None else float(total)

    def _train_batch(self, interaction, batch_idx, loss_func, scaler, total, parts):
        """One optimisation step, as RecBole's; returns the updated loss sums (on the device)."""
        interaction = interaction.to(self.device)
        self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
            losses = loss_func(interaction)
        if isinstance(losses, tuple):
            loss = sum(losses)
            batch_parts = torch.stack([part.detach().float() for part in losses])
            parts = batch_parts if parts is None else parts + batch_parts
        else:
            loss = losses
        total = loss.detach().float() if total is None else total + loss.detach().float()
        if (batch_idx + 1) % self.nan_check_every == 0:
            self._check_nan(total)
        scaler.scale(loss).backward()
        if self.clip_grad_norm:
            clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        return total, parts


class Trainer(ResumableTraining, SyncFreeTrainLoop, RecBoleTrainer):
    """RecBole's Trainer, with a resumable '-last.pth' checkpoint after every epoch, no host-device
    sync per batch; with ``enable_amp``, autocast runs in ``amp_dtype``."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.amp_dtype = amp_dtype(config)

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        with default_autocast_dtype(self.device.type, self.amp_dtype):
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)


def get_trainer(config):
    """The trainer class for ``config``'s model: RecBole's choice, with its generic Trainer replaced by ours."""
    trainer_class = recbole_get_trainer(config["MODEL_TYPE"], config["model"])
    return Trainer if trainer_class is RecBoleTrainer else trainer_class


def _plain_floats(result):
    # RecBole's metrics are numpy scalars, which the weights-only unpickler refuses.
    return None if result is None else {key: float(value) for key, value in result.items()}


def _random_states():
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states):
    random.setstate(_as_tuples(states["python"]))
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def _as_tuples(value):
    # random.setstate needs the tuples that getstate returned; they survive torch.save as tuples,
    # but be tolerant of lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
