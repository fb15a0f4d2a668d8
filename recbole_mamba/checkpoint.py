"""Loading RecBole checkpoints without running code from them.

A RecBole checkpoint is a pickle of a dict holding the whole ``Config``. ``torch.load`` with
``weights_only=True`` (torch's default since 2.6) refuses every class it was not told about; this
module tells it about exactly the classes a RecBole checkpoint legitimately holds (see
:func:`recbole_mamba.compat.checkpoint_classes`) plus the model class named in the file, and only if
that class is a recommender defined in RecBole or in this plugin. Anything else is refused before
unpickling starts.
"""

import importlib

import torch
from recbole.model.abstract_recommender import AbstractRecommender

from recbole_mamba import compat

_MODEL_MODULE_PREFIXES = ("recbole.model.", "recbole_mamba.model.")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint refers to something that is not a known-safe class."""


def _recommender_class(qualified_name):
    """The class a 'module.Class' name refers to, if it is a recommender of RecBole or the plugin."""
    module_name, _, class_name = qualified_name.rpartition(".")
    if not module_name.startswith(_MODEL_MODULE_PREFIXES):
        return None
    try:
        value = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None
    if isinstance(value, type) and issubclass(value, AbstractRecommender):
        return value
    return None


def load_checkpoint(path, map_location="cpu"):
    """``torch.load`` a RecBole checkpoint safely (``weights_only=True``); return the dict."""
    path = str(path)
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip, truncated, not a file: torch's own message says which
        raise UnsafeCheckpointError(f"Cannot read checkpoint '{path}': {e}") from None
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in compat.checkpoint_classes()}
    model_classes = []
    refused = []
    for name in unknown:
        if name in allowed:
            continue
        cls = _recommender_class(name)
        if cls is None:
            refused.append(name)
        else:
            model_classes.append(cls)
    if refused:
        raise UnsafeCheckpointError(
            f"Refusing to load checkpoint '{path}': it refers to {', '.join(sorted(refused))}, which "
            "a RecBole checkpoint never needs, so loading it could run code from the file."
        )
    with torch.serialization.safe_globals([*compat.checkpoint_classes(), *model_classes]):
        return torch.load(path, map_location=map_location, weights_only=True)
