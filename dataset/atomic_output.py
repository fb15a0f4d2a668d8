"""Writing a dataset's atomic files so that a failure leaves nothing half-written.

All files are written into a temporary folder beside the target ``out_dir/<name>``, which is renamed
into place only when every file is complete: RecBole, which trusts any folder it finds, never sees
a partial dataset. An existing dataset folder is replaced only with ``overwrite=True``.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager

import pandas as pd
from tqdm import tqdm

from dataset.raw_files import PreparationError

WRITE_CHUNK_ROWS = 1_000_000


@contextmanager
def dataset_folder(out_dir, name, overwrite=False):
    """Yield a temporary folder; on success it becomes ``out_dir/name``, on failure it is removed."""
    target = os.path.join(out_dir, name)
    if os.path.exists(target) and not overwrite:
        raise PreparationError(f"{target} already exists; pass --overwrite to replace it.")
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private; a dataset folder is not
        yield staging
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=out_dir)
            os.rename(target, os.path.join(old, name))
            os.rename(staging, target)
            shutil.rmtree(old)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic_file(path, frame, types, float_format=None, progress=True):
    """Write ``frame`` as a RecBole atomic file: a header of ``name:type`` and tab-separated rows.

    ``types`` maps each column to its RecBole type (token, float, token_seq, float_seq). Tabs and
    line breaks inside text values would split a row, so they become spaces.
    """
    header = "\t".join(f"{column}:{types[column]}" for column in frame.columns)
    text_columns = [column for column in frame.columns if frame[column].dtype == object or
                    pd.api.types.is_string_dtype(frame[column])]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        bar = tqdm(total=len(frame), desc=os.path.basename(path), unit="rows", unit_scale=True,
                   leave=False, disable=not progress)
        for start in range(0, len(frame), WRITE_CHUNK_ROWS):
            part = frame.iloc[start:start + WRITE_CHUNK_ROWS]
            if text_columns:
                part = part.copy()
                for column in text_columns:
                    part[column] = part[column].fillna("").astype(str).str.replace(r"[\t\r\n]", " ", regex=True)
            part.to_csv(f, sep="\t", header=False, index=False, float_format=float_format, lineterminator="\n")
            bar.update(len(part))
        bar.close()
