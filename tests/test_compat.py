"""RecBole 1.2.1 on numpy 2, torch >= 2.6 and pandas 2 or 3: the fixes in recbole_mamba.compat."""

import http.server
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import create_dataset
from recbole.data.dataset import Dataset
from recbole.trainer import Trainer

from recbole_mamba.checkpoint import UnsafeCheckpointError, load_checkpoint
from recbole_mamba.config import Config
from recbole_mamba.model import Mamba4Rec
from recbole_mamba.quick_start import load_data_and_model
from tests.conftest import FAST_SETTINGS


def test_recbole_config_builds_on_numpy_2():
    assert int(np.__version__.split(".")[0]) >= 2 or pytest.skip("numpy 1 has the aliases natively")
    config = Config("SASRec", "ml-100k")
    assert config["model"] == "SASRec"
    assert np.float is np.float64 and np.unicode is np.str_ and np.bool8 is np.bool_


def test_recbole_quick_start_imports_beside_the_plugin():
    # recbole.quick_start imports RecBole's pinned ray 2.6.3, which needs np.bool8 (numpy 1 only)
    # and pkg_resources (setuptools < 82): RecBole users' own scripts must keep working.
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray, which recbole.quick_start imports, is not installed here")
    result = subprocess.run(
        [sys.executable, "-c", "import recbole_mamba; from recbole.quick_start import run_recbole"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_weights_only_is_not_switched_off():
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ or os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] != "0"


def _tiny_config(tiny_ml100k, **settings):
    data_path, name = tiny_ml100k
    config = Config(
        "Mamba4Rec",
        name,
        config_dict={"data_path": data_path, "mamba_backend": "torch", **FAST_SETTINGS, **settings},
    )
    config["device"] = torch.device("cpu")  # even where a GPU exists: these tests are about files
    return config


def _save_with_recbole_trainer(config, model, folder):
    folder.mkdir(exist_ok=True)
    config["checkpoint_dir"] = str(folder)
    trainer = Trainer(config, model)
    trainer._save_checkpoint(epoch=0)
    return trainer.saved_model_file


def test_checkpoint_save_load_gives_identical_scores(tiny_ml100k, tmp_path):
    config = _tiny_config(tiny_ml100k)
    dataset = create_dataset(config)
    torch.manual_seed(1)
    model = Mamba4Rec(config, dataset)
    model_file = _save_with_recbole_trainer(config, model, tmp_path / "checkpoints")

    # RecBole's Trainer reloads with plain torch.load, whose default is weights_only=True.
    assert torch.load(model_file, weights_only=True)["epoch"] == 0
    _, loaded, _, _, _, test_data = load_data_and_model(model_file)
    model.eval()
    loaded.eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        torch.testing.assert_close(model.full_sort_predict(interaction), loaded.full_sort_predict(interaction), rtol=0, atol=0)


class _WritesMarker:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "config": _WritesMarker(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        load_checkpoint(evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil)  # RecBole's own reload path refuses it too
    assert not marker.exists()


def test_saved_checkpoint_is_complete_even_if_saving_fails(tiny_ml100k, tmp_path, monkeypatch):
    config = _tiny_config(tiny_ml100k)
    model = Mamba4Rec(config, create_dataset(config))
    checkpoints = tmp_path / "checkpoints"
    model_file = _save_with_recbole_trainer(config, model, checkpoints)
    good = Path(model_file).read_bytes()

    def fail_halfway(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_halfway)
    trainer = Trainer(config, model)
    trainer.saved_model_file = model_file
    with pytest.raises(OSError):
        trainer._save_checkpoint(epoch=1)
    assert Path(model_file).read_bytes() == good
    assert [p.name for p in checkpoints.iterdir()] == [Path(model_file).name]  # no temporary file left


def test_token_seq_remapping_and_nan_filling(tmp_path):
    # Unpatched, pandas 3 breaks these (in-place fillna on a copy, Series.agg(len)): see compat.py.
    folder = tmp_path / "feat"
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, 4):
        inter += [f"u{user}\ti{item}\t{user * 10 + item}" for item in range(1, 6)]
    (folder / "feat.inter").write_text("\n".join(inter) + "\n")
    (folder / "feat.item").write_text(
        "item_id:token\tgenres:token_seq\tprice:float\tscores:float_seq\n"
        "i1\tdrama comedy\t1.0\t0 10\n"
        "i2\t\t3.0\t5\n"
        "i3\thorror\t\t\n"
        "i4\tcomedy horror drama\t5.0\t2.5 7.5 10\n"
        "i5\tdrama\t3.0\t0\n"
    )
    config = Config(
        "SASRec",
        "feat",
        config_dict={
            "data_path": str(tmp_path),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genres", "price", "scores"]},
            "user_inter_num_interval": None,
            "item_inter_num_interval": None,
            "normalize_all": False,
            "normalize_field": ["scores"],  # min-max over all cells, then split back into rows
        },
    )
    dataset = create_dataset(config)
    item_feat = dataset.get_item_feature()

    def genres(item):
        iid = dataset.token2id("item_id", item)
        ids = item_feat["genres"][iid]
        return [dataset.id2token("genres", int(t)) for t in ids if t != 0]

    assert genres("i1") == ["drama", "comedy"]
    assert genres("i2") == []
    assert genres("i4") == ["comedy", "horror", "drama"]
    assert item_feat["price"][dataset.token2id("item_id", "i3")].item() == pytest.approx(3.0)  # mean of the rest

    def scores(item):
        iid = dataset.token2id("item_id", item)
        return [float(value) for value in item_feat["scores"][iid]]

    assert scores("i1") == pytest.approx([0.0, 1.0])
    assert scores("i4") == pytest.approx([0.25, 0.75, 1.0])
    assert scores("i3") == []


class _ZipHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_single_process_download_needs_no_process_group(tiny_ml100k, tmp_path, monkeypatch):
    source = Path(tiny_ml100k[0]) / tiny_ml100k[1] / f"{tiny_ml100k[1]}.inter"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # Laid out as RecBole's own archives: <Archive>.zip holding <Archive>.inter.
        archive.writestr("Served_Data.inter", source.read_text())
    _ZipHandler.payload = buffer.getvalue()
    server = http.server.HTTPServer(("127.0.0.1", 0), _ZipHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/Served_Data.zip"
        monkeypatch.setattr(Dataset, "_get_download_url", lambda self, *a, **k: url)
        assert not torch.distributed.is_initialized()
        config = Config("SASRec", "served", config_dict={"data_path": str(tmp_path)})
        dataset = create_dataset(config)
    finally:
        server.shutdown()
    assert dataset.inter_num > 0
    assert (tmp_path / "served" / "served.inter").is_file()
    assert not list((tmp_path / "served").glob("*.zip"))


def _anomaly_mode_after_import(enable_first):
    code = (
        "import torch\n"
        f"torch.autograd.set_detect_anomaly({enable_first})\n"
        "import recbole_mamba\n"
        "from recbole_mamba.config import get_model\n"
        "get_model('SASRec')\n"
        "import recbole.model.sequential_recommender.sine\n"
        "print(torch.is_anomaly_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_recbole_models_do_not_switch_on_anomaly_detection():
    # RecBole's sine.py turns it on at import; it slows every backward pass with a sync per gradient.
    assert _anomaly_mode_after_import(False) == "False"


def test_anomaly_detection_a_user_switched_on_stays_on():
    assert _anomaly_mode_after_import(True) == "True"
