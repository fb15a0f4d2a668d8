"""Loading RecBole checkpoints without running code from them.

A RecBole checkpoint is a pickle of a dict holding the whole ``Config``. ``torch.load`` with
``weights_only=True`` (torch's default since 2.6) refuses every class it was not told about; this
module tells it about exactly the classes a RecBole checkpoint legitimately holds (see
:func:`recbole_mamba.compat.checkpoint_classes`) plus the model class named in the file, and only if
that class is a recommender defined in RecBole or in this plugin. Anything else is refused before
unpickling starts.

Allowing a class also lets a pickle *call* it with arguments of its choosing, and calling
``Config(...)`` runs RecBole's whole configuration code (it sets ``CUDA_VISIBLE_DEVICES``, reads
files, can open a process group). A genuine checkpoint only rebuilds a ``Config`` from its saved
attributes, without calling it, so a pickle that calls any allowed class other than an enum is refused
as well (:func:`_called_globals` reads the pickle's opcodes without executing them).

``trust=True`` (the ``trust_checkpoint`` setting) loads with plain pickle instead: for checkpoints
written by RecBole itself before torch 2.6, and only for files whose origin you trust.
"""

import enum
import importlib
import logging
import os
import pickletools
import zipfile

import torch
from recbole.model.abstract_recommender import AbstractRecommender

from recbole_mamba import compat
from recbole_mamba.errors import UserInputError

_MODEL_MODULE_PREFIXES = ("recbole.model.", "recbole_mamba.model.")
_TRUST_HINT = (
    "If the file is one you made yourself (e.g. a checkpoint RecBole wrote before torch 2.6), load it "
    "with trust_checkpoint=True (--trust_checkpoint=True on the command line), which unpickles it "
    "without these checks."
)


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or used."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint refers to, or calls, something a RecBole checkpoint never needs."""


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


class _Global(str):
    """A 'module.name' reference on the simulated pickle stack."""


def _called_globals(pickle_bytes):
    """The 'module.name' of every global the pickle calls (REDUCE, OBJ, INST), without unpickling.

    Simulates the pickle machine's stack with placeholders, following ``pickletools``' description of
    each opcode, so that a call can be traced back to the global it calls even through the memo.
    """
    stack, marks, memo, called = [], [], {}, []
    for opcode, arg, _ in pickletools.genops(pickle_bytes):
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
        elif name == "GLOBAL":
            stack.append(_Global(arg.replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            attribute, module = stack.pop(), stack.pop()
            stack.append(_Global(f"{module}.{attribute}"))
        elif name == "INST":
            called.append(_Global(arg.replace(" ", ".")))
            del stack[marks.pop():]
            stack.append(None)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "REDUCE":
            stack.pop()
            called.append(stack[-1])
            stack[-1] = None
        elif name == "OBJ":
            start = marks.pop()
            called.append(stack[start])
            del stack[start:]
            stack.append(None)
        elif isinstance(arg, str) and not opcode.stack_before and len(opcode.stack_after) == 1:
            stack.append(arg)  # a string constant (STACK_GLOBAL takes module and name from these)
        else:  # any other opcode: pop what it consumes, push placeholders for what it produces
            before = opcode.stack_before
            if pickletools.markobject in before:
                del stack[marks.pop():]
                before = before[: before.index(pickletools.markobject)]
            if before:
                del stack[-len(before):]
            stack.extend([None] * len(opcode.stack_after))
    return [name for name in called if isinstance(name, _Global)]


def _pickle_bytes(path):
    """The pickle inside a checkpoint written by ``torch.save`` (a zip archive holding 'x/data.pkl')."""
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(names) != 1:
            raise ValueError("it is not a torch.save archive (no single <name>/data.pkl inside)")
        return archive.read(names[0])


def _refused_calls(path, allowed_classes):
    """Allowed classes the pickle would call with arguments; enums only look up a member."""
    never_called = {
        f"{c.__module__}.{c.__qualname__}" for c in allowed_classes if not issubclass(c, enum.Enum)
    }
    return sorted({name for name in _called_globals(_pickle_bytes(path)) if name in never_called})


def load_checkpoint(path, map_location="cpu", trust=False):
    """``torch.load`` a RecBole checkpoint without running code from it; return the dict.

    Raises :class:`CheckpointError` for a missing, truncated or foreign file and
    :class:`UnsafeCheckpointError` for one that names or calls anything a checkpoint does not need.
    ``trust=True`` skips the checks and unpickles the file (for old checkpoints you made yourself).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist (or is not a file).")
    if trust:
        logging.getLogger().warning(
            f"Loading checkpoint '{path}' with trust_checkpoint=True: unpickling it may run code from the file."
        )
        return torch.load(path, map_location=map_location, weights_only=False)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"Cannot read checkpoint '{path}': it is not a complete file written by torch.save "
            "(empty, truncated, or something else)."
        )
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # e.g. pickle protocol 4, which RecBole itself writes: torch says which opcode
        raise CheckpointError(f"Cannot read checkpoint '{path}' safely: {e}. {_TRUST_HINT}") from None
    allowed = list(compat.checkpoint_classes())
    allowed_names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    refused = []
    for name in unknown:
        if name in allowed_names:
            continue
        cls = _recommender_class(name)
        if cls is None:
            refused.append(name)
        else:
            allowed.append(cls)
    if refused:
        raise UnsafeCheckpointError(
            f"Refusing to load checkpoint '{path}': it refers to {', '.join(sorted(refused))}, which "
            f"a RecBole checkpoint never needs, so loading it could run code from the file. {_TRUST_HINT}"
        )
    try:
        calls = _refused_calls(path, allowed)
    except Exception as e:  # a damaged pickle: pickletools says where
        raise CheckpointError(f"Cannot read checkpoint '{path}': {e}") from None
    if calls:
        raise UnsafeCheckpointError(
            f"Refusing to load checkpoint '{path}': its pickle calls {', '.join(calls)} with arguments "
            f"from the file, which a genuine checkpoint never does (it only restores saved attributes). "
            f"{_TRUST_HINT}"
        )
    # Only what is not registered already: leaving the context unregisters its classes, and
    # compat registers RecBole's for the whole process.
    registered = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([c for c in allowed if c not in registered]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # e.g. pickle opcodes of an old RecBole checkpoint (protocol 4)
            raise CheckpointError(f"Cannot load checkpoint '{path}' safely: {e}. {_TRUST_HINT}") from None
