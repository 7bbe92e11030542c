"""Smoke run of scripts/bench_cache_integrity.py (the README's integrity-cost figures): it runs, the row checks accept
the valid rows it writes, and it writes nothing outside its temporary folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_cache_integrity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_cache_integrity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_integrity_benchmark_prints_each_cost(tmp_path, monkeypatch, capsys, dtype):
    monkeypatch.chdir(tmp_path)
    assert load_script().main(["--tokens", "512", "--top-k", "8", "--vocab", "1000", "--rounds", "1", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    for line in ("SHA-256:", "size + header:", "row checks:"):
        assert line in out
    assert list(tmp_path.iterdir()) == []


def test_the_integrity_benchmark_refuses_a_k_above_the_vocabulary():
    with pytest.raises(SystemExit):
        load_script().main(["--top-k", "20", "--vocab", "10"])
