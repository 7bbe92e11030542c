"""`scripts/demo.py --tiny`: the whole main-job pipeline (set-up, prune, CE-only and distilled recovery with a
checkpoint per export, evaluation of every checkpoint, tables, plots) in CI."""

import csv
import json
import os
import subprocess
import sys

from torchtune_kd.testing.recipes import REPO


def test_demo_tiny_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--tiny", "--exports", "2", "--steps-per-export", "2",
         "--teacher-pretrain-steps", "10", "--lm-eval-limit", "2", "--cache", str(tmp_path / "cache"),
         "--out", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in range(1, 7):
        assert f"[{stage}/6]" in result.stdout
    out, cache = tmp_path / "out", tmp_path / "cache"

    # The student is the tiny teacher pruned by block influence: the product command wrote it and its record.
    pruning = json.loads((cache / "student_pruned" / "pruning.json").read_text())
    scores = pruning["block_influence"]
    assert pruning["num_layers"] == 3 and pruning["teacher_num_layers"] == 4
    dropped = min(range(4), key=lambda layer: scores[layer])
    assert pruning["kept_layers"] == [layer for layer in range(4) if layer != dropped]

    rows = {row["model"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"teacher", "pruned", "ce_only", "distilled"}
    assert float(rows["teacher"]["top1_agreement"]) == 1.0 and float(rows["teacher"]["heldout_kl"]) == 0.0
    for name in ("pruned", "ce_only", "distilled"):
        assert float(rows[name]["heldout_kl"]) > 0.0
        assert float(rows[name]["heldout_ppl"]) > 1.0
        assert 0.0 <= float(rows[name]["hellaswag/acc_norm"]) <= 1.0
    # One checkpoint per export, each evaluated; step 0 is the pruned student for both runs; the headline rows are
    # the last checkpoints.
    by_step = list(csv.DictReader(open(out / "by_step.csv")))
    assert [(r["run"], int(r["step"])) for r in by_step] == [(run, s) for run in ("ce_only", "distilled") for s in (0, 2, 4)]
    for row in by_step:
        if row["step"] == "0":
            assert float(row["heldout_ppl"]) == float(rows["pruned"]["heldout_ppl"])
        if row["step"] == "4":
            assert float(row["heldout_kl"]) == float(rows[row["run"]]["heldout_kl"])
    assert float(by_step[1]["heldout_kl"]) != float(by_step[4]["heldout_kl"])  # the two runs trained differently
    for run in ("ce_only", "distilled"):
        assert sorted(p.name for p in (out / run).glob("epoch_*")) == ["epoch_0", "epoch_1"]
        assert not (out / run / "training_state").exists()
    for png in ("heldout_by_step.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 10_000
    text = (out / "results.md").read_text()
    assert "| distilled | 4 |" in text and "Pipeline check, not evidence" in text

    # Every folder records who wrote what (torchtune_kd.output_folder): a rerun replaces exactly these entries.
    def marker(folder):
        return json.loads((folder / ".torchtune_kd_outputs.json").read_text())

    assert marker(out) == {"format": 1, "owner": "scripts/demo.py", "written": [
        "ce_only", "ce_only.log", "distilled", "distilled.log", "lm_eval", "results.md", "results.csv", "by_step.csv",
        "heldout_by_step.png", "loss_curves.png"]}
    assert {p.name for p in out.iterdir()} <= {".torchtune_kd_outputs.json", *marker(out)["written"]}
    assert marker(cache)["owner"] == "scripts/demo.py"
    assert {p.name for p in cache.iterdir()} <= {".torchtune_kd_outputs.json", *marker(cache)["written"]}
    assert marker(cache / "student_pruned")["owner"] == "scripts/prune.py"
    assert marker(out / "ce_only")["owner"] == "torchtune-kd recipe"
