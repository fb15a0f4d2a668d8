"""LFM-1b (http://www.cp.jku.at/datasets/LFM-1b/) listening events to RecBole atomic files.

Raw file: ``LFM-1b_LEs.txt``, tab-separated, no header, one listening event per line:
    user-id  artist-id  album-id  track-id  timestamp (Unix seconds)
One of ``--item track|album|artist`` is the item. Every event is an interaction (repeated listens
stay: they are the sequence). Each user keeps the most recent ``max_events_per_user`` events (ties in
file order), ids are renumbered 1..n; the .user and .item files map them back to the raw ids.
"""

import csv
import os

import numpy as np
import pandas as pd

from dataset.atomic_output import dataset_folder, write_atomic_file
from dataset.raw_files import BadLines, PreparationError, integer_column, read_chunks
from dataset.recent_events import RecentEvents, contiguous_ids

EVENTS_FILE = "LFM-1b_LEs.txt"
COLUMNS = ["user_id", "artist_id", "album_id", "track_id", "timestamp"]
ITEMS = ("track", "album", "artist")


def find_events(raw_dir):
    for path in (os.path.join(raw_dir, EVENTS_FILE), raw_dir):
        if os.path.isfile(path):
            return path
    raise PreparationError(f"No {EVENTS_FILE} in {raw_dir} (LFM-1b's listening events file).")


def read_events(path, item, max_events_per_user=None, chunk_rows=None, on_bad_lines="error", bad_lines=None,
                progress=True):
    """(user, item, timestamp) of each user's most recent events, sorted by user and time."""
    if item not in ITEMS:
        raise PreparationError(f"item must be one of {', '.join(ITEMS)}, got {item!r}.")
    recent = RecentEvents(max_events_per_user)
    for first_line, chunk in read_chunks(path, sep="\t", names=COLUMNS, quoting=csv.QUOTE_NONE, chunk_rows=chunk_rows,
                                         on_bad_lines=on_bad_lines, bad_lines=bad_lines, progress=progress):
        bad = np.zeros(len(chunk), dtype=bool)
        columns = {}
        for column in ("user_id", f"{item}_id", "timestamp"):
            columns[column], column_bad = integer_column(chunk, column, path, first_line, on_bad_lines, bad_lines)
            bad |= column_bad
        if bad_lines is not None:
            bad_lines.add(path, int(bad.sum()))
        recent.add(columns["user_id"][~bad], columns[f"{item}_id"][~bad], columns["timestamp"][~bad])
    return recent.result()


def prepare(raw_dir, out_dir, item="track", name=None, max_events_per_user=None, overwrite=False,
            chunk_rows=None, on_bad_lines="error", progress=True, log=print):
    """Write ``out_dir/<name>/<name>.inter`` (default name lfm1b-tracks / -albums / -artists)."""
    path = find_events(raw_dir)
    name = name or f"lfm1b-{item}s"
    bad_lines = BadLines()
    log(f"Reading listening events from {path}")
    user, item_ids, timestamp = read_events(path, item, max_events_per_user, chunk_rows, on_bad_lines, bad_lines,
                                            progress)
    if len(user) == 0:
        raise PreparationError(f"{path} holds no listening events.")
    write_events(out_dir, name, user, item_ids, timestamp, overwrite=overwrite, progress=progress)
    for line in bad_lines.report():
        log(line)
    log(f"Wrote {os.path.join(out_dir, name)}: {len(user):,} events of {len(np.unique(user)):,} users.")
    return os.path.join(out_dir, name)


def write_events(out_dir, name, user, item, timestamp, user_keys=None, item_features=None, overwrite=False,
                 progress=True):
    """Write the .inter file (integer timestamps) and the .user / .item id maps of sorted events.

    ``user_keys[code]`` is the raw user id of integer code ``code`` when users were read as strings;
    ``item_features``: optional DataFrame indexed by ``item``'s values, written into the .item file
    (its ``raw_item_id`` column, if any, replaces the integer).
    """
    user_token, user_raw = contiguous_ids(user)
    item_token, item_raw = contiguous_ids(item)
    inter = pd.DataFrame({"user_id": user_token, "item_id": item_token, "timestamp": timestamp})
    raw_users = user_raw if user_keys is None else np.asarray(user_keys, dtype=object)[user_raw]
    users = pd.DataFrame({"user_id": np.arange(1, len(user_raw) + 1), "raw_user_id": raw_users})
    items = pd.DataFrame({"item_id": np.arange(1, len(item_raw) + 1), "raw_item_id": item_raw})
    item_types = {"item_id": "token", "raw_item_id": "token"}
    if item_features is not None:
        for column, values in item_features.reindex(item_raw).items():
            items[column], item_types[column] = values.to_numpy(), "token"
    with dataset_folder(out_dir, name, overwrite) as folder:
        write_atomic_file(os.path.join(folder, f"{name}.inter"), inter,
                          {"user_id": "token", "item_id": "token", "timestamp": "float"}, progress=progress)
        write_atomic_file(os.path.join(folder, f"{name}.user"), users,
                          {"user_id": "token", "raw_user_id": "token"}, progress=progress)
        write_atomic_file(os.path.join(folder, f"{name}.item"), items, item_types, progress=progress)
