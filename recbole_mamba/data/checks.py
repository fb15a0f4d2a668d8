"""Checks on a dataset's files before RecBole reads them, so mistakes get a clear message.

RecBole's own errors for a missing folder or column surface deep inside pandas; these checks read
only the folder listing and the header line of the ``.inter`` file.
"""

import difflib
import os

import yaml

from recbole_mamba.errors import UserInputError


def downloadable_datasets():
    """Names of the datasets RecBole can download (its ``properties/dataset/url.yaml``)."""
    import recbole

    url_file = os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml")
    with open(url_file, encoding="utf-8") as f:
        return list(yaml.safe_load(f))


def _inter_header(path, separator):
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise UserInputError(f"Dataset file '{path}' is empty: line 1 should be the header (e.g. user_id:token).")
    fields = {}
    for column in header.split(separator):
        name, colon, ftype = column.partition(":")
        if not colon:
            raise UserInputError(
                f"Dataset file '{path}', line 1: column '{column}' has no type; RecBole's atomic "
                "format names each column as name:type (e.g. user_id:token, timestamp:float)."
            )
        fields[name] = ftype
    return fields


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
    fields = _inter_header(inter_file, config["field_separator"])
    missing = [field for field in required_inter_fields(config) if field not in fields]
    if missing:
        raise UserInputError(
            f"Dataset file '{inter_file}' lacks the field(s) {', '.join(missing)} that this run needs "
            f"(user/item ids, load_col, and the time field for the time-ordered split); it has "
            f"{', '.join(fields)}. Add the column(s), or change USER_ID_FIELD / ITEM_ID_FIELD / "
            "TIME_FIELD / load_col (and eval_args.order: RO for data without time) to match the file."
        )
