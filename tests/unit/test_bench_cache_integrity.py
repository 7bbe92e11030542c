"""Smoke run of scripts/bench_cache_integrity.py (torchtune_kd.cli.bench_cache_integrity; the README's integrity-cost figures): it runs, the row checks accept
the valid rows it writes, and it writes nothing outside its temporary folder."""

from __future__ import annotations

import pytest

from torchtune_kd.cli import bench_cache_integrity


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_integrity_benchmark_prints_each_cost(tmp_path, monkeypatch, capsys, dtype):
    monkeypatch.chdir(tmp_path)
    assert bench_cache_integrity.main(["--tokens", "512", "--top-k", "8", "--vocab", "1000", "--rounds", "1", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    for line in ("SHA-256:", "size + header:", "row checks:"):
        assert line in out
    assert list(tmp_path.iterdir()) == []


def test_the_integrity_benchmark_refuses_a_k_above_the_vocabulary():
    with pytest.raises(SystemExit):
        bench_cache_integrity.main(["--top-k", "20", "--vocab", "10"])
