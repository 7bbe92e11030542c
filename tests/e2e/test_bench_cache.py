"""scripts/bench_cache.py end to end in ``--smoke`` mode, one test per part (each well under a minute).

Smoke tests: the tables and ratios must be there and be finite, positive numbers; timings are never compared with
each other (timing tests lie). What is deterministic is checked exactly: the models' parameter ratio, the cache's
size growing with k, and the CE-only baseline (KD weight 0) being unchanged by the cache.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def run_smoke(part: str, workdir: Path) -> str:
    """Run the benchmark's smoke mode for one part; its stdout (the run must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_cache.py"), "--smoke", "--part", part, "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"`python scripts/bench_cache.py --smoke --part {part} --workdir {workdir}`" in result.stdout
    return result.stdout


def table_row(stdout: str, *first_cells: str) -> list[list[float]]:
    """The numbers of each cell (after ``first_cells``) of the markdown row starting with ``first_cells``."""
    prefix = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"expected one row {prefix!r} in:\n{stdout[-3000:]}"
    cells = [cell.strip() for cell in rows[0][len(prefix):].strip().strip("|").split("|")]
    return [[float(x) for x in NUMBER.findall(cell)] for cell in cells]


def finite_positive(values: list[list[float]]) -> bool:
    return all(cell and all(math.isfinite(x) and x > 0 for x in cell) for cell in values)


def test_speed_smoke_reports_prepass_epochs_and_memory(tmp_path: Path) -> None:
    stdout = run_smoke("speed", tmp_path)
    ratio = float(re.search(r"teacher / student = ([\d.]+)", stdout).group(1))
    assert 3.8 <= ratio <= 4.5  # the "teacher about 4x the student"
    prepass = {k: table_row(stdout, k) for k in ("4", "8")}
    for cells in prepass.values():
        assert len(cells) == 7 and finite_positive(cells)
    # bytes / token grows with k (ids and log-probabilities per kept token); the token rows are the same data.
    assert prepass["8"][6][0] > prepass["4"][6][0] and prepass["8"][4] == prepass["4"][4]
    for first in ("1", "median"):
        cells = table_row(stdout, first)
        assert len(cells) == 6 and finite_positive(cells)
    median_ratio = float(re.search(r"cached / live epoch time: median ([\d.]+)", stdout).group(1))
    assert math.isfinite(median_ratio) and median_ratio > 0
    assert "never loaded by the cached run" in stdout

    results = json.loads((tmp_path / "results.json").read_text())
    speed = results["speed"]
    assert [p["k"] for p in speed["prepass"]] == [4, 8]
    assert len(speed["rounds"]) == 1 and set(speed["rounds"][0]) == {"live", "cached"}
    assert speed["teacher_weights_mib"] == speed["teacher_params"] * 4 / 2**20


def test_quality_smoke_compares_cached_with_live(tmp_path: Path) -> None:
    stdout = run_smoke("quality", tmp_path)
    for setting in ("ce_only", "forward_kl+ir_off"):
        ppl = table_row(stdout, setting, "1", "held-out perplexity")
        assert len(ppl) == 3 and finite_positive(ppl[:2]) and math.isfinite(ppl[2][0])
        agreement = table_row(stdout, setting, "1", "top-1 agreement")
        assert len(agreement) == 3 and all(cell and all(math.isfinite(x) for x in cell) for cell in agreement)

    quality = json.loads((tmp_path / "results.json").read_text())["quality"]
    assert quality["teacher_sources_cached"] == ["cache"]  # every cached cell read the cache
    # CE-only has KD weight 0: the cache cannot change it (same seed, same data order).
    ce = quality["settings"]["ce_only"]["heldout_ppl"]["values"]
    assert ce["cached"] == ce["live"]
