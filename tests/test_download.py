"""RecBole's dataset download through the plugin, from a local HTTP server: a good archive trains; a
dropped connection or a corrupt archive is a clear error that leaves nothing behind, and the next
run downloads cleanly."""

import http.server
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from recbole.data.dataset import Dataset

import run_recbole_mamba
from recbole_mamba import run
from recbole_mamba.errors import DownloadError
from tests.conftest import FAST_SETTINGS, TINY_MAMBA

RECBOLE_DOWNLOAD_URL = Dataset._get_download_url  # before any test points it at the local server

# A name RecBole knows how to download (so the plugin lets it be fetched); its URL is pointed at the
# local server below.
DATASET = "ml-1m"


class Server(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` with its full length announced; ``cut_after`` closes the connection early."""

    payload = b""
    cut_after = None
    stall_s = 0  # after sending the first cut_after bytes, go silent this long
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        body = self.payload if self.cut_after is None else self.payload[: self.cut_after]
        self.wfile.write(body)
        self.wfile.flush()
        time.sleep(self.stall_s)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}/ml-1m.zip"
    monkeypatch.setattr(Dataset, "_get_download_url", lambda self, *args, **kwargs: url)
    monkeypatch.setattr(Server, "requests", 0)
    monkeypatch.setattr(Server, "cut_after", None)
    monkeypatch.setattr(Server, "stall_s", 0)
    monkeypatch.setattr(Server, "port", httpd.server_port, raising=False)
    yield Server
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def archive(few_users_ml100k):
    """A zip laid out as RecBole's own (<Archive>.zip holding <Archive>.inter) with the tiny slice."""
    data_path, name = few_users_ml100k
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-1m.inter", (Path(data_path) / name / f"{name}.inter").read_text())
    return buffer.getvalue()


def settings(data_path):
    return {**FAST_SETTINGS, **TINY_MAMBA, "data_path": str(data_path), "epochs": 1, "MAX_ITEM_LIST_LENGTH": 10}


def nothing_left(data_path):
    return [p.name for p in Path(data_path).iterdir()] == []


def test_downloaded_dataset_trains(server, archive, tmp_path):
    server.payload = archive
    data_path = tmp_path / "datasets"
    assert not torch.distributed.is_initialized()  # a single process: RecBole's barrier would raise
    result = run("Mamba4Rec", DATASET, config_dict=settings(data_path))
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert sorted(p.name for p in data_path.iterdir()) == [DATASET]
    assert [p.name for p in (data_path / DATASET).iterdir()] == [f"{DATASET}.inter"]


def corrupt(archive):
    data = bytearray(archive)
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zeros over compressed data: fails its CRC or inflating
    return bytes(data)


@pytest.mark.parametrize(
    "failure, message",
    [
        ("dropped", r"stopped after [\d,]+ of [\d,]+ bytes|connection was closed"),
        ("corrupt", r"corrupt|not a valid zip"),
        ("not a zip", r"not a valid zip"),
        ("no .inter", r"holds no ml-1m\.inter"),
        ("bad line", r"not usable: Dataset file .*ml-1m\.inter', line 3: 2 field\(s\)"),
    ],
)
def test_failed_download_is_clear_leaves_nothing_and_retries(server, archive, tmp_path, failure, message):
    data_path = tmp_path / "datasets"
    if failure == "dropped":
        server.payload, server.cut_after = archive, len(archive) // 2
    elif failure == "corrupt":
        server.payload = corrupt(archive)
    elif failure == "not a zip":
        server.payload = b"<html>Service unavailable</html>"
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            if failure == "no .inter":
                zf.writestr("README.txt", "no data here")
            else:
                zf.writestr("ml-1m.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n")
        server.payload = buffer.getvalue()
    with pytest.raises(DownloadError, match=message):
        run("Mamba4Rec", DATASET, config_dict=settings(data_path))
    assert nothing_left(data_path)

    # The server recovers: the next run downloads the whole dataset (it does not trust a leftover).
    server.payload, server.cut_after = archive, None
    from recbole.data import create_dataset

    from recbole_mamba.quick_start import create_config

    dataset = create_dataset(create_config("Mamba4Rec", DATASET, config_dict=settings(data_path)))
    assert dataset.inter_num > 0
    assert [p.name for p in data_path.iterdir()] == [DATASET]


def test_cli_reports_a_failed_download_without_traceback(server, tmp_path, capsys, monkeypatch):
    server.payload = b"garbage"
    monkeypatch.chdir(tmp_path)
    data_path = tmp_path / "datasets"
    args = [f"--{key}={value}" for key, value in settings(data_path).items()]
    status = run_recbole_mamba.main(["--model=Mamba4Rec", f"--dataset={DATASET}", *args])
    err = capsys.readouterr().err  # the run's log, then the error as its last line
    assert status == 1 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert "not a valid zip" in err and "run again" in err
    assert nothing_left(data_path)


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    # A port nothing listens on (bound, then closed).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(Dataset, "_get_download_url", lambda self, *a, **k: f"http://127.0.0.1:{port}/ml-1m.zip")
    with pytest.raises(DownloadError, match="Connection refused|URLError"):
        run("Mamba4Rec", DATASET, config_dict=settings(tmp_path / "datasets"))
    assert nothing_left(tmp_path / "datasets")


def test_silent_server_times_out_instead_of_hanging(server, archive, tmp_path, monkeypatch):
    from recbole_mamba.data import download

    monkeypatch.setattr(download, "TIMEOUT_S", 1)
    server.payload, server.cut_after, server.stall_s = archive, 100, 5
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        run("Mamba4Rec", DATASET, config_dict=settings(tmp_path / "datasets"))
    assert time.monotonic() - started < 5
    assert nothing_left(tmp_path / "datasets")


def test_lfm1b_download_key_resolves_and_trains(server, few_users_ml100k, tmp_path, monkeypatch):
    # RecBole's url.yaml names the archive differently from the key (lfm1b-tracks-not-merged ->
    # .../not_merged/lfm1b-tracks.zip holding lfm1b-tracks.inter), and its files call the item field
    # tracks_id: the same archive name and header are served here, from the local server. Without
    # the plugin's yaml/dataset/lfm1b-*.yaml presets RecBole fails after the download (KeyError 'item_id').
    def local_url(self, *args, **kwargs):
        archive_name = RECBOLE_DOWNLOAD_URL(self, *args, **kwargs).rpartition("/")[2]
        return f"http://127.0.0.1:{server.port}/{archive_name}"

    key, item_field = "lfm1b-tracks-not-merged", "tracks_id"
    monkeypatch.setattr(Dataset, "_get_download_url", local_url)
    data_path, name = few_users_ml100k
    rows = (Path(data_path) / name / f"{name}.inter").read_text().splitlines()
    header = rows[0].split("\t")
    columns = [header.index("user_id:token"), header.index("item_id:token"), header.index("timestamp:float")]
    lines = [f"user_id:token\t{item_field}:token\ttimestamp:float"]
    lines += ["\t".join(row.split("\t")[i] for i in columns) for row in rows[1:]]
    archive_stem = "lfm1b-tracks"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{archive_stem}.inter", "\n".join(lines) + "\n")
    server.payload = buffer.getvalue()

    result = run("Mamba4Rec", key, config_dict=settings(tmp_path / "datasets"))
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert [p.name for p in (tmp_path / "datasets" / key).iterdir()] == [f"{key}.inter"]
