"""Checks on a dataset's files before RecBole reads them, so mistakes get a clear message.

RecBole's own errors for a missing folder or column surface deep inside pandas, and some damaged
lines pass silently (see :mod:`recbole_mamba.data.atomic_files`). These checks read the folder
listing, the header of the ``.inter`` file, and then every line of each atomic file RecBole will load;
:func:`check_loaded_dataset` checks what is left after RecBole's filtering.
"""

import difflib
import locale
import os

import yaml

from recbole_mamba.data.atomic_files import check_atomic_file, read_header
from recbole_mamba.errors import UserInputError

ATOMIC_SUFFIXES = ("inter", "user", "item")


def downloadable_datasets():
    """Names of the datasets RecBole can download (its ``properties/dataset/url.yaml``)."""
    import recbole

    url_file = os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml")
    with open(url_file, encoding="utf-8") as f:
        return list(yaml.safe_load(f))


def required_inter_fields(config):
    """The fields of the .inter file that this config will read."""
    needed = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]
    load_col = config["load_col"]
    if isinstance(load_col, dict) and load_col.get("inter"):
        needed += list(load_col["inter"])
    if (config["eval_args"] or {}).get("order") == "TO":
        needed.append(config["TIME_FIELD"])
    return list(dict.fromkeys(needed))


def check_dataset_files(config):
    """Raise :class:`UserInputError` if the dataset cannot be found, downloaded or read as configured."""
    name = config["dataset"]
    folder = os.path.abspath(config["data_path"])
    if not os.path.isdir(folder):
        known = downloadable_datasets()
        if name in known:
            return  # RecBole downloads it into ``folder``
        close = difflib.get_close_matches(name, known, n=4)
        hint = f" Downloadable names close to it: {', '.join(close)}." if close else ""
        raise UserInputError(
            f"Dataset '{name}' not found: there is no folder '{folder}', and '{name}' is not one of "
            f"the datasets RecBole can download.{hint} Put {name}.inter (RecBole atomic format) in "
            f"that folder, or pass --data_path=DIR where DIR/{name}/{name}.inter exists."
        )
    inter_file = os.path.join(folder, f"{name}.inter")
    if not os.path.isfile(inter_file):
        present = sorted(os.listdir(folder))[:10]
        raise UserInputError(
            f"Dataset folder '{folder}' has no {name}.inter (it holds: {', '.join(present) or 'nothing'}). "
            f"RecBole reads interactions from <data_path>/{name}/{name}.inter."
        )
    fields = read_header(inter_file, config["field_separator"], file_encoding(config))
    missing = [field for field in required_inter_fields(config) if field not in fields]
    if missing:
        raise UserInputError(
            f"Dataset file '{inter_file}' lacks the field(s) {', '.join(missing)} that this run needs "
            f"(user/item ids, load_col, and the time field for the time-ordered split); it has "
            f"{', '.join(fields)}. Add the column(s), or change USER_ID_FIELD / ITEM_ID_FIELD / "
            "TIME_FIELD / load_col (and eval_args.order: RO for data without time) to match the file."
        )
    check_atomic_files(config, folder)


def file_encoding(config):
    # RecBole passes its encoding setting (None by default) to open(), which then uses the locale's.
    return config["encoding"] or locale.getpreferredencoding(False)


def loaded_columns(config, suffix, header):
    """{name: type} of the columns RecBole loads from ``<dataset>.<suffix>`` (its load_col rules)."""
    load_col, unload_col = config["load_col"], config["unload_col"] or {}
    if load_col is None or load_col.get(suffix) == "*":
        names = set(header)
    elif suffix not in load_col:
        return {}
    else:
        names = set(load_col[suffix])
    names -= set(unload_col.get(suffix) or ())
    return {name: ftype for name, ftype in header.items() if name in names}


def check_atomic_files(config, folder):
    """Check every line of the atomic files in ``folder`` that RecBole will load for ``config``."""
    name = config["dataset"]
    ids = {config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]}
    for suffix in ATOMIC_SUFFIXES:
        path = os.path.join(folder, f"{name}.{suffix}")
        if not os.path.isfile(path):
            continue
        header = read_header(path, config["field_separator"], file_encoding(config))
        columns = loaded_columns(config, suffix, header)
        if columns:
            check_atomic_file(
                path,
                columns,
                ids=ids,
                separator=config["field_separator"],
                seq_separator=config["seq_separator"],
                encoding=file_encoding(config),
            )
