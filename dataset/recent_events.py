"""Each user's most recent events, kept in memory that grows with the output, not the input.

Events arrive in chunks as integer arrays (user, item, time). Every event also gets its position in
the input (``order``), so that events with equal times keep the order of the raw files. Whenever the
newly added events outnumber those already kept, everything is sorted by (user, time, order) and
only each user's last ``max_events_per_user`` events are kept: memory stays within about twice the
final output, and the total sorting work within a constant factor of one sort of the output.
"""

import numpy as np

MIN_COMPACTION_ROWS = 4_000_000


class RecentEvents:
    def __init__(self, max_events_per_user=None):
        if max_events_per_user is not None and max_events_per_user < 1:
            raise ValueError(f"max_events_per_user must be >= 1 or None, got {max_events_per_user}")
        self.cap = max_events_per_user
        self._kept = _empty()
        self._pending = []
        self._pending_rows = 0
        self._seen = 0

    def add(self, user, item, time):
        """Add a chunk of events (equal-length integer arrays), in the raw files' order."""
        order = np.arange(self._seen, self._seen + len(user), dtype=np.int64)
        self._seen += len(user)
        self._pending.append((np.asarray(user, np.int64), np.asarray(item, np.int64),
                              np.asarray(time, np.int64), order))
        self._pending_rows += len(user)
        if self.cap is not None and self._pending_rows >= max(MIN_COMPACTION_ROWS, len(self._kept[0])):
            self._compact()

    def result(self):
        """(user, item, time) of the kept events, sorted by user, then time, then input order."""
        self._compact()
        user, item, time, _ = self._kept
        return user, item, time

    def _compact(self):
        if not self._pending:
            return
        columns = [np.concatenate([part[i] for part in [self._kept, *self._pending]]) for i in range(4)]
        self._pending, self._pending_rows = [], 0
        user, item, time, order = columns
        index = np.lexsort((order, time, user))  # the last key is the primary one
        user, item, time, order = user[index], item[index], time[index], order[index]
        if self.cap is not None:
            keep = _last_per_group(user, self.cap)
            user, item, time, order = user[keep], item[keep], time[keep], order[keep]
        self._kept = (user, item, time, order)


def _last_per_group(sorted_keys, n):
    """Mask of the last ``n`` rows of each run of equal keys in ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    group_end = np.repeat(ends, ends - starts)
    return group_end - np.arange(len(sorted_keys)) <= n


def _empty():
    return tuple(np.zeros(0, dtype=np.int64) for _ in range(4))


def contiguous_ids(raw_ids):
    """(tokens, originals): ``raw_ids`` renumbered 1..n in ascending order of the raw id, and the
    raw id of each token (``originals[token - 1]``)."""
    originals, inverse = np.unique(raw_ids, return_inverse=True)
    return inverse.astype(np.int64) + 1, originals


class Vocabulary:
    """Integer codes for string keys (user names, MusicBrainz ids), numbered in order of first sight."""

    def __init__(self):
        self._codes = {}
        self.keys = []

    def encode(self, keys):
        """Codes of the pandas Series ``keys`` (new keys are added)."""
        codes = keys.map(self._codes)
        new = codes.isna()
        if new.any():
            for key in keys[new].unique():
                self._codes[key] = len(self.keys)
                self.keys.append(key)
            codes = keys.map(self._codes)
        return codes.to_numpy(dtype=np.int64)
