"""Downloading one of RecBole's datasets so that a failure leaves nothing behind.

RecBole decides whether to download by whether the dataset folder exists, so a folder left by a
download that died half way (a truncated archive, a partly extracted one) would be trusted by every
later run. Here everything happens in a temporary folder beside the target, which is renamed into
place only once the archive is complete, intact and holds the dataset's ``.inter`` file; on any
failure the temporary folder is removed and :class:`~recbole_mamba.errors.DownloadError` says what
went wrong, so the next run simply downloads again.
"""

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

from recbole.utils.url import rename_atomic_files

from recbole_mamba.errors import DownloadError, UserInputError

CHUNK_BYTES = 1 << 20
# Seconds a connection may stay silent before the download is abandoned (never hang).
TIMEOUT_S = 60


def download_dataset(url, dataset_path, dataset_name, logger, check=None):
    """Download the zip at ``url`` and install its atomic files as ``dataset_path/<dataset_name>.*``.

    ``check(folder)`` may inspect the extracted files before they are installed; a
    :class:`~recbole_mamba.errors.UserInputError` from it becomes a DownloadError.
    """
    parent = os.path.dirname(os.path.abspath(dataset_path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{dataset_name}.download-", dir=parent)
    try:
        archive = fetch(url, staging)
        _extract(archive, staging, url)
        os.unlink(archive)
        basename = os.path.splitext(os.path.basename(archive))[0]
        rename_atomic_files(staging, basename, dataset_name)
        if not os.path.isfile(os.path.join(staging, f"{dataset_name}.inter")):
            held = ", ".join(sorted(os.listdir(staging))) or "nothing"
            raise DownloadError(
                f"The archive downloaded from {url} holds no {basename}.inter (it holds: {held}), "
                f"so it cannot become dataset '{dataset_name}'. Nothing was kept."
            )
        if check is not None:
            try:
                check(staging)
            except UserInputError as e:
                raise DownloadError(f"The dataset downloaded from {url} is not usable: {e} Nothing was kept.") from None
        if os.path.exists(dataset_path):  # another process finished the same download first
            shutil.rmtree(staging)
        else:
            os.rename(staging, dataset_path)  # atomic: the folder appears complete or not at all
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a folder that cannot be written, ...
            raise DownloadError(f"Installing dataset '{dataset_name}' from {url} into '{dataset_path}' "
                                f"failed: {e}. Nothing was kept.") from None
        raise
    logger.info(f"Downloaded dataset [{dataset_name}] into [{dataset_path}].")


def fetch(url, folder):
    """Stream ``url`` into ``folder``; the file must have exactly the length the server announced."""
    path = os.path.join(folder, url.rpartition("/")[2] or "download.zip")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(path, "wb") as f:
            expected = response.headers.get("Content-Length")
            _confirm_size(url, expected)
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                received += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:  # http.client errors are OSError or ValueError
        raise DownloadError(f"Downloading {url} failed: {_describe(e)}. Nothing was kept; run again to retry.") from None
    if expected is not None and received != int(expected):
        raise DownloadError(
            f"Downloading {url} stopped after {received:,} of {int(expected):,} bytes (the connection "
            "was closed early). Nothing was kept; run again to retry."
        )
    return path


def _confirm_size(url, content_length):
    """RecBole asks before downloading more than 1 GB; so does this."""
    if content_length is None or int(content_length) <= 1 << 30:
        return
    question = f"This will download {int(content_length) / (1 << 30):.2f} GB from {url}. Proceed? (y/N)\n"
    try:
        proceed = input(question).strip().lower() == "y"
    except EOFError:  # no terminal to answer on
        proceed = False
    if not proceed:
        raise DownloadError(f"Download of {url} ({int(content_length):,} bytes) not confirmed; nothing was kept.")


def _describe(error):
    import http.client

    if isinstance(error, http.client.IncompleteRead):
        return f"the connection was closed after {len(error.partial):,} bytes, {error.expected:,} more expected"
    return f"{type(error).__name__}: {error}"


def _extract(archive, folder, url):
    """Unzip after checking every member's CRC, so that a corrupt archive extracts nothing."""
    try:
        with zipfile.ZipFile(archive) as zf:
            damaged = zf.testzip()
            if damaged is not None:
                raise DownloadError(f"The archive downloaded from {url} is corrupt (member '{damaged}' fails its CRC check).")
            zf.extractall(folder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        raise DownloadError(f"The file downloaded from {url} is not a valid zip archive ({e}). "
                            "Nothing was kept; run again to retry.") from None
