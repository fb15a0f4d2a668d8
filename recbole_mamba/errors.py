"""Exceptions for failures a user can act on, as opposed to bugs.

The CLI prints these as a single paragraph, without a traceback: a ``UserInputError`` exits with
status 2, a ``DownloadError`` with status 1. Anything else that goes wrong is a bug and keeps its
traceback. :func:`is_int` is the integer test the checks that raise them share.
"""


def is_int(value):
    """Whether a config or command-line value is an integer: YAML's true and false are ints to Python, not here."""
    return isinstance(value, int) and not isinstance(value, bool)


class UserInputError(ValueError):
    """Bad input: a model name, config file, hyperparameter, dataset or checkpoint that cannot be used."""


class DownloadError(RuntimeError):
    """A dataset download that failed (network, server, archive); nothing of it was kept."""
