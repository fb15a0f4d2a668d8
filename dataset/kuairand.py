"""KuaiRand-27K / KuaiRand-1K (https://kuairand.com) to RecBole atomic files.

Raw layout (one folder, or its ``data/`` subfolder), comma-separated with a header line:
    log_standard_4_08_to_4_21_<v>[_part1|_part2].csv   standard feed, 8-21 April 2022
    log_standard_4_22_to_5_08_<v>[_part1|_part2].csv   standard feed, 22 April - 8 May 2022
    log_random_4_22_to_5_08_<v>.csv                    randomly exposed videos, same users
    user_features_<v>.csv, video_features_basic_<v>.csv
where <v> is 27k, 1k or pure. Log columns used: user_id, video_id, time_ms, is_click.

Every log row is an impression; only rows with is_click == 1 become interactions. Each user keeps
the most recent ``max_events_per_user`` clicks (by time_ms; ties in file order), ids are renumbered
1..n, and the timestamp is time_ms in seconds (millisecond precision).
"""

import glob
import os
import re

import numpy as np
import pandas as pd

from dataset.atomic_output import dataset_folder, write_atomic_file
from dataset.raw_files import (
    BadLines, PreparationError, integer_column, read_chunks, report_bad_rows, require_columns,
)
from dataset.recent_events import RecentEvents, contiguous_ids

LOG_COLUMNS = ["user_id", "video_id", "time_ms", "is_click"]
LOG_PATTERN = re.compile(r"log_(standard|random)_(\d+)_(\d+)_to_\d+_\d+_(27k|1k|pure)(_part\d+)?\.csv$")
# Columns of user_features / video_features_basic written as floats; every other one is a token.
FLOAT_FEATURES = {"follow_user_num", "fans_user_num", "friend_user_num", "register_days",
                  "video_duration", "server_width", "server_height"}


def find_logs(raw_dir, include_random=True):
    """(version, log files in name order) found in ``raw_dir`` or ``raw_dir/data``."""
    folders = [raw_dir, os.path.join(raw_dir, "data")]
    logs = sorted((path for folder in folders for path in glob.glob(os.path.join(folder, "log_*.csv"))
                   if LOG_PATTERN.search(os.path.basename(path))), key=_period_then_name)
    if not logs:
        raise PreparationError(f"No KuaiRand log files (log_standard_*_27k.csv, log_random_*_1k.csv, ...) "
                               f"in {raw_dir} or {os.path.join(raw_dir, 'data')}.")
    versions = {LOG_PATTERN.search(os.path.basename(path)).group(4) for path in logs}
    if len(versions) > 1:
        raise PreparationError(f"{raw_dir} mixes the log files of several KuaiRand versions "
                               f"({', '.join(sorted(versions))}); point --raw_dir at one of them.")
    if not include_random:
        logs = [path for path in logs if "log_random_" not in os.path.basename(path)]
    return versions.pop(), logs


def _period_then_name(path):
    # Read the logs in time order (8-21 April, then 22 April - 8 May: log_random, then log_standard),
    # so that clicks with equal time_ms keep an order that does not depend on the folder listing.
    match = LOG_PATTERN.search(os.path.basename(path))
    return int(match.group(2)), int(match.group(3)), os.path.basename(path)


def read_clicks(logs, max_events_per_user=None, chunk_rows=None, on_bad_lines="error", bad_lines=None,
                progress=True):
    """(user, video, time_ms) of each user's most recent clicks in ``logs``, sorted by user and time."""
    for path in logs:  # every header before any long read
        require_columns(path, ",", LOG_COLUMNS)
    recent = RecentEvents(max_events_per_user)
    for path in logs:
        for first_line, chunk in read_chunks(path, sep=",", chunk_rows=chunk_rows, on_bad_lines=on_bad_lines,
                                             bad_lines=bad_lines, progress=progress):
            args = (path, first_line, on_bad_lines, bad_lines)
            click, bad = integer_column(chunk, "is_click", *args)
            not_binary = ~bad & (click != 0) & (click != 1)
            report_bad_rows(path, chunk, "is_click", not_binary, first_line, on_bad_lines, bad_lines, "0 or 1")
            bad |= not_binary
            columns = {}
            for column in ("user_id", "video_id", "time_ms"):
                columns[column], column_bad = integer_column(chunk, column, *args)
                bad |= column_bad
            if bad_lines is not None:
                bad_lines.add(path, int(bad.sum()))
            keep = ~bad & (click == 1)
            recent.add(columns["user_id"][keep], columns["video_id"][keep], columns["time_ms"][keep])
    return recent.result()


def prepare(raw_dir, out_dir, name=None, max_events_per_user=None, include_random=True, overwrite=False,
            chunk_rows=None, on_bad_lines="error", progress=True, log=print):
    """Write ``out_dir/<name>/<name>.inter`` (+ .user, .item when the feature files are there)."""
    version, logs = find_logs(raw_dir, include_random)
    name = name or f"kuairand-{version}"
    bad_lines = BadLines()
    log(f"Reading clicks from {len(logs)} log file(s): {', '.join(os.path.basename(p) for p in logs)}")
    user, video, time_ms = read_clicks(logs, max_events_per_user, chunk_rows, on_bad_lines, bad_lines, progress)
    if len(user) == 0:
        raise PreparationError(f"The KuaiRand logs in {raw_dir} hold no clicks (is_click == 1).")
    user_token, user_raw = contiguous_ids(user)
    item_token, item_raw = contiguous_ids(video)
    inter = pd.DataFrame({"user_id": user_token, "item_id": item_token, "timestamp": time_ms / 1000})
    features_dir = os.path.dirname(logs[0])
    with dataset_folder(out_dir, name, overwrite) as folder:
        write_atomic_file(os.path.join(folder, f"{name}.inter"), inter,
                          {"user_id": "token", "item_id": "token", "timestamp": "float"},
                          float_format="%.3f", progress=progress)
        users = _features(os.path.join(features_dir, f"user_features_{version}.csv"), "user_id", user_raw,
                          chunk_rows, on_bad_lines, bad_lines, progress)
        _write_features(os.path.join(folder, f"{name}.user"), "user_id", user_raw, users, progress)
        videos = _features(os.path.join(features_dir, f"video_features_basic_{version}.csv"), "video_id",
                           item_raw, chunk_rows, on_bad_lines, bad_lines, progress)
        _write_features(os.path.join(folder, f"{name}.item"), "item_id", item_raw, videos, progress)
    for line in bad_lines.report():
        log(line)
    log(f"Wrote {os.path.join(out_dir, name)}: {len(inter):,} clicks of {len(user_raw):,} users on "
        f"{len(item_raw):,} videos.")
    return os.path.join(out_dir, name)


def _features(path, id_column, kept_ids, chunk_rows, on_bad_lines, bad_lines, progress):
    """The rows of the feature file ``path`` whose ``id_column`` is in ``kept_ids`` (None without the file)."""
    if not os.path.isfile(path):
        return None
    require_columns(path, ",", [id_column])
    parts = []
    for first_line, chunk in read_chunks(path, sep=",", dtype=str, chunk_rows=chunk_rows,
                                         on_bad_lines=on_bad_lines, bad_lines=bad_lines, progress=progress):
        ids, bad = integer_column(chunk, id_column, path, first_line, on_bad_lines, bad_lines)
        if bad_lines is not None:
            bad_lines.add(path, int(bad.sum()))
        keep = ~bad & np.isin(ids, kept_ids)
        part = chunk[keep].copy()
        part[id_column] = ids[keep]
        parts.append(part)
    features = pd.concat(parts, ignore_index=True).drop_duplicates(id_column, keep="first")
    return features.set_index(id_column)


def _write_features(path, id_field, raw_ids, features, progress):
    """Write ``<id_field>:token``, the raw id, and the features (when known) of every kept id."""
    raw_column = f"raw_{id_field}"  # the id in the raw files, to trace results back
    frame = pd.DataFrame({id_field: np.arange(1, len(raw_ids) + 1), raw_column: raw_ids})
    types = {id_field: "token", raw_column: "token"}
    if features is not None:
        features = features.reindex(raw_ids)
        for column in features.columns:
            values = features[column].to_numpy()
            if column == "tag":  # "12,65": a list of category ids
                frame[column], types[column] = pd.Series(values).fillna("").str.replace(",", " "), "token_seq"
            else:
                frame[column], types[column] = values, "float" if column in FLOAT_FEATURES else "token"
    write_atomic_file(path, frame, types, progress=progress)
