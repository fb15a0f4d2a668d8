"""benchmarks/step_memory.py's bookkeeping (it runs only on a GPU): the peak of a recorded allocation
trace and what is alive at that moment, and its table."""

import importlib.util

from tests.conftest import REPO


def load(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("step_memory_benchmark", REPO / "benchmarks" / "step_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame(filename, line):
    return [{"filename": filename, "line": line, "name": "f"}]


def test_live_at_peak_replays_allocations_and_frees(monkeypatch):
    step_memory = load(monkeypatch)
    mib = 2**20
    events = [
        {"action": "alloc", "addr": 1, "size": 4 * mib, "frames": frame("/x/recbole_mamba/a.py", 1)},
        {"action": "alloc", "addr": 2, "size": 8 * mib, "frames": frame("/x/recbole_mamba/b.py", 2)},
        {"action": "free_requested", "addr": 1, "size": 4 * mib},
        {"action": "alloc", "addr": 3, "size": 2 * mib, "frames": frame("/x/torch/c.py", 3)},
        {"action": "alloc", "addr": 4, "size": 3 * mib, "frames": frame("/x/recbole_mamba/b.py", 2)},  # peak: 13
        {"action": "free_requested", "addr": 2, "size": 8 * mib},
        {"action": "alloc", "addr": 5, "size": 1 * mib, "frames": []},
    ]
    result = step_memory._live_at_peak({"device_traces": [events]})
    assert result["peak_mib"] == 13
    assert result["by_code_mib"] == {"b.py:2 (f) <- b.py:2 (f)": 11, "? <- c.py:3 (f)": 2}


def test_table_compares_with_sasrec(monkeypatch):
    step_memory = load(monkeypatch)
    rows = [{"variant": "default", "step_ms": 10.0, "peak_reserved_gib": 1.5, "peak_allocated_gib": 0.2,
             "pools_gib": {"(0, 0)": 0.1, "(0, 1)": 1.4}},
            {"variant": "recompute", "error": "exit 1: boom"},
            {"variant": "sasrec", "step_ms": 32.0, "peak_reserved_gib": 8.0, "peak_allocated_gib": 6.8,
             "pools_gib": {"(0, 0)": 8.0}}]
    text = step_memory.table(rows)
    assert "| default | 10.00 | 1.500 | 0.200 | 1.400 | 3.20x faster / 0.188x |" in text
    assert "| recompute | exit 1: boom |" in text
