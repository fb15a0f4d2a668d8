"""Reading raw interaction logs of any size in chunks, with clear errors for damaged lines.

A raw log is read by pandas' C parser in chunks of ``chunk_rows`` lines, so memory does not grow
with the file. Lines pandas cannot split into the right number of fields, and values that are not
what a column must hold (an id that is not an integer, an empty field), are either an error naming
the file, the line and the value (``on_bad_lines="error"``, the default) or are skipped and counted
(``on_bad_lines="skip"``), never silently read as something else.
"""

import os
import re
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
from tqdm import tqdm

DEFAULT_CHUNK_ROWS = 1_000_000
ON_BAD_LINES = ("error", "skip")


class PreparationError(ValueError):
    """Raw files that cannot be prepared as given: the message names the file, column or value."""


class BadLines:
    """What ``on_bad_lines="skip"`` dropped, per file, for the report at the end."""

    def __init__(self):
        self.counts = {}
        self.examples = {}

    def add(self, path, count, example=None):
        """Count ``count`` more skipped lines of ``path``; ``example`` describes one of them."""
        if count:
            self.counts[path] = self.counts.get(path, 0) + count
        if example is not None:
            self.examples.setdefault(path, example)

    def report(self):
        return [
            f"skipped {count:,} bad line(s) of {path} (first: {self.examples[path]})"
            for path, count in self.counts.items()
        ]


def read_header(path, sep):
    """The column names on the first line of ``path``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [name.strip() for name in f.readline().rstrip("\r\n").split(sep)]


def require_columns(path, sep, needed):
    """Raise PreparationError unless the header of ``path`` has every column in ``needed``."""
    header = read_header(path, sep)
    missing = [column for column in needed if column not in header]
    if missing:
        raise PreparationError(
            f"{path} has no column(s) {', '.join(missing)} (its header has: {', '.join(header)}). "
            "Is this the right file?"
        )


def read_chunks(path, *, sep, names=None, dtype=None, quoting=0, chunk_rows=None,
                on_bad_lines="error", bad_lines=None, progress=True):
    """Yield (first_line, DataFrame) for consecutive chunks of the delimited file ``path``.

    ``names=None`` reads the column names from the file's first line; otherwise the file has no
    header and ``names`` lists all its fields. ``first_line`` is the 1-based line number of the
    chunk's first row (exact unless lines were skipped before it).
    """
    if on_bad_lines not in ON_BAD_LINES:
        raise PreparationError(f"on_bad_lines must be one of {', '.join(ON_BAD_LINES)}, got {on_bad_lines!r}.")
    header_lines = 0 if names is not None else 1
    with _progress_file(path, progress) as f:
        reader = pd.read_csv(
            f, sep=sep, header=None if names is not None else 0, names=names, dtype=dtype,
            quoting=quoting, chunksize=chunk_rows or DEFAULT_CHUNK_ROWS, encoding="utf-8", encoding_errors="replace",
            # Every line is a row: an empty line is a bad line, and a line with one field too many
            # is never taken for an index column.
            skip_blank_lines=False, index_col=False,
            on_bad_lines="warn" if on_bad_lines == "skip" else "error",
        )
        rows_before = 0
        while True:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    chunk = next(reader)
            except StopIteration:
                return
            except pd.errors.ParserError as e:
                raise PreparationError(f"{path}: {_parser_message(e)}. Fix or remove the line, "
                                       "or pass --on_bad_lines=skip to skip such lines.") from None
            skipped = _skipped_lines(path, caught, on_bad_lines)
            if bad_lines is not None and skipped:
                bad_lines.add(path, len(skipped), skipped[0])
            yield header_lines + rows_before + 1, chunk
            rows_before += len(chunk)


def integer_column(chunk, column, path, first_line, on_bad_lines, bad_lines):
    """``chunk[column]`` as int64, and the mask of rows whose value is not an integer.

    With on_bad_lines="error" the first such value raises a PreparationError naming its line.
    """
    values = chunk[column]
    if not pd.api.types.is_integer_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna().to_numpy() | (numbers.to_numpy(dtype=float, na_value=np.nan) % 1 != 0)
        if bad.any():
            _report_bad_value(path, chunk, column, bad, first_line, on_bad_lines, bad_lines, "an integer")
            numbers = numbers.where(~bad, 0)
        return numbers.astype("int64").to_numpy(), bad
    return values.to_numpy(dtype="int64"), np.zeros(len(values), dtype=bool)


def text_column(chunk, column, path, first_line, on_bad_lines, bad_lines, required=True):
    """``chunk[column]`` as stripped strings ("" for empty) and the mask of rows where it is required
    but empty."""
    values = chunk[column].fillna("").astype(str).str.strip()
    bad = (values == "").to_numpy(copy=True) if required else np.zeros(len(values), dtype=bool)
    if bad.any():
        _report_bad_value(path, chunk, column, bad, first_line, on_bad_lines, bad_lines, "a non-empty value")
    return values, bad


def report_bad_rows(path, chunk, column, bad, first_line, on_bad_lines, bad_lines, expected):
    """Raise for, or count, the rows in ``bad`` whose ``column`` does not hold ``expected``."""
    if bad.any():
        _report_bad_value(path, chunk, column, bad, first_line, on_bad_lines, bad_lines, expected)


def _report_bad_value(path, chunk, column, bad, first_line, on_bad_lines, bad_lines, expected):
    position = int(np.flatnonzero(bad)[0])
    value = chunk[column].iloc[position]
    where = f"line {first_line + position}, column {column}"
    if pd.isna(value) or str(value).strip() == "":
        shown = "an empty field"
    else:
        shown = repr(value) if isinstance(value, str) else str(value)
    if on_bad_lines == "error":
        raise PreparationError(f"{path}, {where}: {shown} is not {expected}. Fix or remove the line, "
                               "or pass --on_bad_lines=skip to skip such lines.")
    if bad_lines is not None:  # the caller counts the rows it drops, once each
        bad_lines.add(path, 0, f"{where}: {shown}")


def _parser_message(error):
    # pandas says "Error tokenizing data. C error: Expected 5 fields in line 7, saw 6\n".
    text = str(error).strip()
    return text.split("C error: ", 1)[-1]


def _skipped_lines(path, caught, on_bad_lines):
    skipped = []
    for warning in caught:
        message = str(warning.message)
        if "does not match length of data" in message:  # the first row has an extra field
            if on_bad_lines == "error":
                raise PreparationError(f"{path}: the first data line has more fields than the header. "
                                       "Fix or remove the line.")
            skipped.append("the first data line has more fields than the header")
        skipped += [line.strip() for line in re.findall(r"Skipping line [^\n]*", message)]
    return skipped


@contextmanager
def _progress_file(path, progress):
    """``path`` opened for reading, with a progress bar over its bytes."""
    if not os.path.isfile(path):
        raise PreparationError(f"No file {path}.")
    with open(path, "rb") as raw:
        if not progress:
            yield raw
            return
        with tqdm.wrapattr(raw, "read", total=os.path.getsize(path), desc=os.path.basename(path),
                           unit="B", unit_scale=True, unit_divisor=1024, leave=False) as wrapped:
            yield wrapped
