"""The loss benchmark runs end to end (a smoke test; the numbers themselves are never asserted: timing tests lie)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_every_measurement(tmp_path: Path) -> None:
    methods = ["torchtune_forward_kl_chunked", "ours_jsd_chunked", "ours_skew_reverse_kl_chunked"]
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
