"""The benchmarks run end to end (smoke tests; the numbers themselves are never asserted: timing tests lie)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_every_measurement(tmp_path: Path) -> None:
    # One method of each kind (each runs in a fresh process, most of its time importing torch): the baseline, a plain
    # full-logits reference, a chunked divergence and the fused pass.
    methods = ["torchtune_forward_kl_chunked", "full_logits_torch_jsd", "ours_jsd_chunked", "ours_fused_jsd"]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_losses.py"), "--quick", "--rounds", "2", "--threads", "1",
         "--methods", ",".join(methods), "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.read_text())
    rounds = report["cases"]["256x4000"]
    assert len(rounds) == 2
    for measurements in rounds:
        assert sorted(measurements) == sorted(methods)
        for method, result in measurements.items():
            assert result["method"] == method
            assert result["seconds"] > 0 and result["peak_mib"] >= 0


def test_recipe_benchmark_runs_both_recipes(tmp_path: Path) -> None:
    """scripts/bench_recipe.py end to end on a small vocabulary (a smoke test: its numbers are never asserted)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_recipe.py"), "--vocab", "1280", "--rounds", "1", "--steps", "2",
         "--warmup", "1", "--variants", "upstream,ours_seed_fused", "--student-dim", "64", "--teacher-dim", "128",
         "--batch-size", "2", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = json.loads(out.read_text())["rounds"]
    assert sorted(rounds[0]) == ["ours_seed_fused", "upstream"]
    for measurement in rounds[0].values():
        assert measurement["tokens_per_second"] > 0 and measurement["max_rss_mib"] > 0 and measurement["steps"] == 2
    assert "| ours_seed_fused |" in result.stdout
