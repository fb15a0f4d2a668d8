"""Last.fm-1K (http://ocelma.net/MusicRecommendationDataset/lastfm-1K.html) to RecBole atomic files.

Raw file: ``userid-timestamp-artid-artname-traid-traname.tsv``, tab-separated, no header, no quoting
(names contain quote characters), newest event first for each user:
    user_000639  2009-04-08T01:57:47Z  artist MBID  artist name  track MBID  track name
MusicBrainz ids are often empty, so an item is its MBID when there is one and otherwise its names
(artist name + track name for tracks, the artist name for artists). Each user keeps the most recent
``max_events_per_user`` events (ties in file order); ids are renumbered 1..n, the timestamp is in
Unix seconds. The .item file keeps the MBID and the names of each item, the .user file the user name.
"""

import csv
import os

import numpy as np
import pandas as pd

from dataset.lfm1b import write_events
from dataset.raw_files import BadLines, PreparationError, read_chunks, report_bad_rows, text_column
from dataset.recent_events import RecentEvents, Vocabulary

EVENTS_FILE = "userid-timestamp-artid-artname-traid-traname.tsv"
COLUMNS = ["user", "timestamp", "artist_mbid", "artist_name", "track_mbid", "track_name"]
ITEMS = ("track", "artist")
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def find_events(raw_dir):
    for path in (os.path.join(raw_dir, EVENTS_FILE), os.path.join(raw_dir, "lastfm-dataset-1K", EVENTS_FILE),
                 raw_dir):
        if os.path.isfile(path):
            return path
    raise PreparationError(f"No {EVENTS_FILE} in {raw_dir} (Last.fm-1K's listening events file).")


class ItemTable:
    """Item codes (by MBID, else by names) and the MBID and names first seen for each."""

    def __init__(self, item):
        self.item = item
        self.codes = Vocabulary()
        self.rows = []

    def encode(self, chunk):
        fields = {column: chunk[column].fillna("").astype(str).str.strip() for column in COLUMNS[2:]}
        mbid, names = fields[f"{self.item}_mbid"], fields["artist_name"]
        if self.item == "track":
            names = names + "\t" + fields["track_name"]
        keys = mbid.where(mbid != "", "\t" + names)  # the tab keeps name keys apart from MBIDs
        missing = ((mbid == "") & (fields[f"{self.item}_name"] == "")).to_numpy()
        before = len(self.codes.keys)
        codes = self.codes.encode(keys)
        new = codes >= before
        if new.any():
            first = pd.DataFrame({"code": codes[new], **{c: v[new].to_numpy() for c, v in fields.items()}})
            self.rows.append(first.drop_duplicates("code"))
        return codes, missing

    def features(self):
        table = pd.concat(self.rows, ignore_index=True).set_index("code")
        columns = {"raw_item_id": table[f"{self.item}_mbid"], "artist_name": table["artist_name"]}
        if self.item == "track":
            columns["track_name"] = table["track_name"]
        return pd.DataFrame(columns)


def read_events(path, item="track", max_events_per_user=None, chunk_rows=None, on_bad_lines="error",
                bad_lines=None, progress=True):
    """(user code, item code, timestamp, user names, item table) of each user's most recent events."""
    if item not in ITEMS:
        raise PreparationError(f"item must be one of {', '.join(ITEMS)}, got {item!r}.")
    recent, users, items = RecentEvents(max_events_per_user), Vocabulary(), ItemTable(item)
    for first_line, chunk in read_chunks(path, sep="\t", names=COLUMNS, dtype=str, quoting=csv.QUOTE_NONE,
                                         chunk_rows=chunk_rows, on_bad_lines=on_bad_lines, bad_lines=bad_lines,
                                         progress=progress):
        args = (path, chunk)
        user, bad = text_column(chunk, "user", path, first_line, on_bad_lines, bad_lines)
        when = pd.to_datetime(chunk["timestamp"], format="%Y-%m-%dT%H:%M:%SZ", errors="coerce", utc=True)
        bad_time = when.isna().to_numpy() & ~bad
        report_bad_rows(*args, "timestamp", bad_time, first_line, on_bad_lines, bad_lines,
                        "a time like 2009-04-08T01:57:47Z")
        bad |= bad_time
        item_codes, no_item = items.encode(chunk)
        no_item = no_item & ~bad
        report_bad_rows(*args, f"{item}_name", no_item, first_line, on_bad_lines, bad_lines,
                        f"a {item} (its MBID and name are both empty)")
        bad |= no_item
        if bad_lines is not None:
            bad_lines.add(path, int(bad.sum()))
        seconds = ((when - EPOCH) // pd.Timedelta(seconds=1)).fillna(0).astype("int64").to_numpy()
        recent.add(users.encode(user[~bad]), item_codes[~bad], seconds[~bad])
    user_codes, item_codes, timestamp = recent.result()
    return user_codes, item_codes, timestamp, users.keys, items


def prepare(raw_dir, out_dir, item="track", name=None, max_events_per_user=None, overwrite=False,
            chunk_rows=None, on_bad_lines="error", progress=True, log=print):
    """Write ``out_dir/<name>/<name>.inter`` (default name lastfm-1k, or lastfm-1k-artists)."""
    path = find_events(raw_dir)
    name = name or ("lastfm-1k" if item == "track" else "lastfm-1k-artists")
    bad_lines = BadLines()
    log(f"Reading listening events from {path}")
    user, item_codes, timestamp, user_names, items = read_events(
        path, item, max_events_per_user, chunk_rows, on_bad_lines, bad_lines, progress)
    if len(user) == 0:
        raise PreparationError(f"{path} holds no listening events.")
    write_events(out_dir, name, user, item_codes, timestamp, user_keys=user_names, item_features=items.features(),
                 overwrite=overwrite, progress=progress)
    for line in bad_lines.report():
        log(line)
    log(f"Wrote {os.path.join(out_dir, name)}: {len(user):,} events of {len(np.unique(user)):,} users.")
    return os.path.join(out_dir, name)
