"""`scripts/demo.py --tiny`: the whole main-job pipeline (set-up, distil, CE-only, evaluate, table, plot) in CI."""

import csv
import os
import subprocess
import sys

from recipe_utils import REPO


def test_demo_tiny_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--tiny", "--steps", "4", "--teacher-pretrain-steps", "10",
         "--lm-eval-limit", "2", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in range(1, 6):
        assert f"[{stage}/5]" in result.stdout
    out = tmp_path / "out"
    rows = {row["model"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"teacher", "student_init", "ce_only", "distilled"}
    assert float(rows["teacher"]["top1_agreement"]) == 1.0
    for row in rows.values():
        assert float(row["heldout_ppl"]) > 1.0
        assert 0.0 <= float(row["hellaswag/acc_norm"]) <= 1.0
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert "| distilled |" in (out / "results.md").read_text()
