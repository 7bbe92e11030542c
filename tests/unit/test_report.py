"""The demo's results (torchtune_kd.evaluation.report): the headline table, the lm-eval check and every checkpoint's
row come from the metrics given, in the demo's layout; the plots get every curve in step order."""

from __future__ import annotations

import csv
from pathlib import Path

from torchtune_kd.evaluation import report


def _metrics(ppl: float, kl: float, agreement: float) -> dict[str, float]:
    return {"perplexity": ppl, "kl_to_teacher": kl, "top1_agreement": agreement, "tokens": 640.0,
            "bits_per_byte": ppl / 100}


def _lm_results(acc: float) -> dict:
    # lm-eval's results layout: results[task]["<metric>,none"] and "<metric>_stderr,none".
    return {"results": {task: {f"{metric},none": acc, f"{metric}_stderr,none": 0.01}
                        for task, metric in report.CHECK_METRICS}}


def test_the_recovery_report_writes_the_demos_tables_from_the_metrics(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report.plots, "plot_metrics_by_step",
                        lambda curves, path, *a, **k: drawn.setdefault("by_step", (curves, path)))
    monkeypatch.setattr(report.plots, "plot_runs", lambda runs, path, **k: drawn.setdefault("losses", (runs, path)))
    monkeypatch.setattr(report.run_logs, "read_run_logs", lambda folder: (Path(folder).parent.name, {"loss": []}))
    heldout = {"teacher": _metrics(5.0, 0.0, 1.0), "pruned": _metrics(40.0, 2.0, 0.3),
               "ce_only@2": _metrics(30.0, 1.5, 0.35), "ce_only@4": _metrics(25.0, 1.2, 0.4),
               "distilled@2": _metrics(20.0, 0.8, 0.5), "distilled@4": _metrics(15.0, 0.6, 0.55)}
    lm = {name: _lm_results(acc) for name, acc in (("teacher", 0.5), ("pruned", 0.3), ("ce_only", 0.35),
                                                   ("distilled", 0.4))}
    exports = [(2, tmp_path / "epoch_0"), (4, tmp_path / "epoch_1")]

    table, note, check, check_note = report.write_recovery_report(
        tmp_path, heldout, lm, ce_only=exports, distilled=exports, total_steps=4, num_layers=3, seed=7, lm_eval_limit=2)

    assert table.splitlines()[2:] == ["| teacher | – | 5.00 | 0.0500 | 0.0000 | 1.0000 |",
                                      "| pruned | 0 | 40.00 | 0.4000 | 2.0000 | 0.3000 |",
                                      "| ce_only | 4 | 25.00 | 0.2500 | 1.2000 | 0.4000 |",
                                      "| distilled | 4 | 15.00 | 0.1500 | 0.6000 | 0.5500 |"]
    assert "bits/byte" in table.splitlines()[0]
    assert "| distilled | 0.400 ± 0.010 | 0.400 ± 0.010 | 0.400 ± 0.010 |" in check
    assert "640 tokens" in note and "3 most influential layers" in note and "(seed 7)" in note
    assert "(2 documents per task)" in check_note
    assert (tmp_path / "results.md").read_text() == table + "\n" + note + "\n\n" + check + "\n" + check_note + "\n"
    by_step = [(r["run"], r["step"], r["heldout_ppl"]) for r in csv.DictReader(open(tmp_path / "by_step.csv"))]
    assert by_step == [("ce_only", "0", "40.0"), ("ce_only", "2", "30.0"), ("ce_only", "4", "25.0"),
                       ("distilled", "0", "40.0"), ("distilled", "2", "20.0"), ("distilled", "4", "15.0")]
    assert [row["model"] for row in csv.DictReader(open(tmp_path / "results.csv"))] == [
        "teacher", "pruned", "ce_only", "distilled"]
    curves, path = drawn["by_step"]
    assert path == tmp_path / "heldout_by_step.png" and [s for s, _ in curves["distilled"]] == [0, 2, 4]
    assert set(drawn["losses"][0]) == {"distilled", "ce_only"}
