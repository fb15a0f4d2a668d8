"""benchmarks/lifelong.py runs end to end on a CPU with tiny sizes (its smoke mode) and writes its
results: every model at every length, and RecMamba's full-ranking accuracy."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


def load_benchmark(results_folder, monkeypatch):
    """benchmarks/lifelong.py as a module, writing its results into ``results_folder``."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("lifelong_benchmark", REPO / "benchmarks" / "lifelong.py")
    lifelong = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lifelong)
    monkeypatch.setattr(sys.modules["_report"], "RESULTS", results_folder)
    return lifelong


@pytest.mark.slow
def test_lifelong_benchmark_smoke(tmp_path, monkeypatch):
    lifelong = load_benchmark(tmp_path, monkeypatch)

    assert lifelong.main(["--smoke", "--max_batches=1"]) == 0
    results = json.loads((tmp_path / "lifelong.json").read_text())["results"]
    speed = results["speed"]
    assert {(r["model"], r["length"]) for r in speed} == {
        (model, length) for model in lifelong.ENCODERS for length in lifelong.SMOKE["lengths"]}
    for row in speed:
        assert row["timed_batches"] == 1 and row["extrapolated"] and row["tokens_per_s"] > 0
    (accuracy,) = results["accuracy"]
    assert accuracy["model"] == "RecMamba" and 0 <= accuracy["test"]["ndcg@10"] <= 1
    markdown = (tmp_path / "lifelong.md").read_text()
    assert "GENERATED data" in markdown and "flash-attention transformer" in markdown


@pytest.mark.slow
def test_lifelong_profile_part_leaves_the_speed_results_alone(tmp_path, monkeypatch):
    lifelong = load_benchmark(tmp_path, monkeypatch)
    (tmp_path / "lifelong.md").write_text("earlier speed results")

    assert lifelong.main(["--smoke", "--parts=profile", "--loss_type=BCE"]) == 0
    profile = (tmp_path / "lifelong_profile.txt").read_text()
    for encoder in lifelong.ENCODERS:
        assert f"## {encoder}: 2 training steps at L=16" in profile and "loss BCE" in profile
    assert "Self CPU time total" in profile  # torch.profiler's table (CPU times without a GPU)
    assert (tmp_path / "lifelong.md").read_text() == "earlier speed results"
    assert not (tmp_path / "lifelong.json").exists()
