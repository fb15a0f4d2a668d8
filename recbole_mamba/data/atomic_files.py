"""Line-by-line checks of RecBole atomic files (``.inter``, ``.user``, ``.item``) before RecBole reads them.

RecBole reads these files with ``pandas.read_csv(engine="python")``, which turns several mistakes
into silent damage instead of errors: a line with a field too many loses it, a line with a field
too few gets a missing value, an empty or ``NA`` user / item id becomes the padding id 0, and a
non-numeric ``float`` cell stops the run with a message that names neither the file nor the line.
:func:`check_atomic_file` reads the file as pandas' python engine does (the same ``csv`` dialect)
and raises :class:`~recbole_mamba.errors.UserInputError` naming the file, the line and the problem.

What stays RecBole's documented behaviour, and so passes: empty cells in other columns (tokens
are filled with the padding id, floats with the column mean), blank lines (skipped), duplicate rows
(kept unless ``rm_dup_inter`` is set), Windows line endings, any text as a token id (spaces and unicode included; ids
are remapped to 1..n, so huge id values cost nothing).
"""

import csv
import math

from recbole_mamba.errors import UserInputError

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")

# Cells pandas.read_csv reads as missing values by default (its documented na_values).
PANDAS_MISSING = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


class _PandasPythonDialect(csv.Dialect):
    """What ``read_csv(engine="python")`` hands to the csv module with RecBole's arguments."""

    delimiter = "\t"
    quotechar = '"'
    doublequote = True
    skipinitialspace = False
    quoting = csv.QUOTE_MINIMAL
    lineterminator = "\n"
    strict = True


def read_header(path, separator, encoding):
    """{column name: type} from line 1, exactly as RecBole splits it; a clear error if unusable."""
    try:
        with open(path, encoding=encoding) as f:
            line = f.readline()
    except UnicodeDecodeError as e:
        raise UserInputError(f"Dataset file '{path}', line 1: not {encoding} text ({e.reason}).") from None
    if not line.strip():
        raise UserInputError(f"Dataset file '{path}' is empty: line 1 should be the header (e.g. user_id:token).")
    if line.startswith("\ufeff"):
        raise UserInputError(
            f"Dataset file '{path}' starts with a byte-order mark, which would become part of the first "
            "column's name: save it without one, or set encoding: utf-8-sig."
        )
    header = line[:-1] if line.endswith("\n") else line
    fields = {}
    for column in header.split(separator):
        name, colon, ftype = column.partition(":")
        if not colon:
            raise UserInputError(
                f"Dataset file '{path}', line 1: column '{column}' has no type; RecBole's atomic "
                "format names each column as name:type (e.g. user_id:token, timestamp:float)."
            )
        if ftype not in FEATURE_TYPES:
            raise UserInputError(
                f"Dataset file '{path}', line 1: column '{column}' has type '{ftype}'; the types are "
                f"{', '.join(FEATURE_TYPES)}."
            )
        if name in fields:
            raise UserInputError(f"Dataset file '{path}', line 1: column '{name}' appears twice.")
        fields[name] = ftype
    return fields


def check_atomic_file(path, columns, ids, separator="\t", seq_separator=" ", encoding="utf-8"):
    """Check every line of an atomic file.

    Args:
        path: the file.
        columns: {name: type} of the columns RecBole will load (the others are only counted).
        ids: names of the columns that must hold a value on every line (user and item ids).
        separator, seq_separator, encoding: RecBole's ``field_separator``, ``seq_separator``, ``encoding``.
    """
    header = read_header(path, separator, encoding)
    if len(separator) != 1:  # pandas then splits by a regular expression; leave it to pandas
        return
    names = list(header)
    # Only loaded columns are checked: ids must be present, float cells must be numbers.
    id_columns = [(i, name) for i, name in enumerate(names) if name in columns and name in ids]
    float_columns = [(i, name) for i, name in enumerate(names) if columns.get(name) == "float"]
    float_seq_columns = [(i, name) for i, name in enumerate(names) if columns.get(name) == "float_seq"]
    dialect = type("Dialect", (_PandasPythonDialect,), {"delimiter": separator})
    rows = 0
    start = 2  # the line the next record starts on (line 1 is the header)
    try:
        with open(path, encoding=encoding, newline="") as f:
            f.readline()
            reader = csv.reader(f, dialect)
            for row in reader:
                line, start = start, reader.line_num + 2
                if not row:  # blank line: pandas skips it
                    continue
                rows += 1
                if len(row) != len(names):
                    raise UserInputError(
                        f"Dataset file '{path}', line {line}: {len(row)} field(s), but the header names "
                        f"{len(names)} ({', '.join(names)}); a separator ({separator!r}) is missing or extra."
                    )
                for i, name in id_columns:
                    if row[i] in PANDAS_MISSING:
                        raise _missing_id(path, line, name, row[i])
                for i, name in float_columns:
                    if row[i] not in PANDAS_MISSING and not _is_finite_number(row[i]):
                        raise _not_a_number(path, line, name, row[i])
                for i, name in float_seq_columns:
                    for piece in row[i].split(seq_separator):
                        if piece and not _is_finite_number(piece):
                            raise _not_a_number(path, line, name, piece)
    except csv.Error as e:
        raise UserInputError(
            f"Dataset file '{path}', line {start}: cannot be split into fields ({e}); a double quote (\") "
            "at the start of a field opens a quoted field, which must be closed before the next separator."
        ) from None
    except UnicodeDecodeError as e:
        raise UserInputError(
            f"Dataset file '{path}', line {_first_undecodable_line(path, encoding)}: not {encoding} text "
            f"({e.reason}); set encoding to the file's encoding."
        ) from None
    if rows == 0:
        raise UserInputError(f"Dataset file '{path}' has a header but no data lines.")


def _is_finite_number(text):
    try:
        return math.isfinite(float(text)) and "_" not in text  # float() accepts 1_000, pandas does not
    except ValueError:
        return False


def _missing_id(path, line, name, value):
    shown = "is empty" if value == "" else f"is '{value}', which pandas reads as a missing value"
    return UserInputError(
        f"Dataset file '{path}', line {line}: {name} {shown}; every line needs a value for {name} "
        "(RecBole would silently turn it into the padding id)."
    )


def _not_a_number(path, line, name, text):
    return UserInputError(
        f"Dataset file '{path}', line {line}: {name} is '{text}', which is not a finite number "
        f"(the header declares {name} as float)."
    )


def _first_undecodable_line(path, encoding):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                return number
    return "?"
