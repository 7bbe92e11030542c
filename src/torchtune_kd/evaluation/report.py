"""The demo's results: a pruned student recovered by CE alone and by distillation, compared on held-out text.

:func:`write_recovery_report` turns the held-out metrics of every checkpoint (:mod:`heldout_metrics`) and the lm-eval
results of the final models (:mod:`lm_eval_runner`) into the demo's outputs: ``results.md`` (the headline table and
the lm-eval pipeline check), ``results.csv``, ``by_step.csv`` (every checkpoint), ``heldout_by_step.png`` and
``loss_curves.png``. It returns the text blocks it wrote, for the command to print.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

from torchtune_kd.evaluation import plots, run_logs, tables

# The held-out metrics drawn against the step, with their axis labels (arrows: which way is better).
HEADLINE_METRICS = (("perplexity", "held-out perplexity ↓"), ("kl_to_teacher", "held-out KL(teacher ‖ model) ↓"),
                    ("top1_agreement", "top-1 agreement with teacher ↑"))
# The lm-eval task / metric pairs of the pipeline check.
CHECK_METRICS = (("truthfulqa_mc2", "acc"), ("hellaswag", "acc_norm"), ("commonsense_qa", "acc"))


def write_recovery_report(
    out: Path,
    heldout: Mapping[str, Mapping[str, float]],
    lm_results: Mapping[str, Mapping[str, Any]],
    *,
    ce_only: Sequence[tuple[int, Path]],
    distilled: Sequence[tuple[int, Path]],
    total_steps: int,
    num_layers: int,
    seed: int,
    lm_eval_limit: int,
) -> tuple[str, str, str, str]:
    """Write the demo's tables, CSVs and plots into ``out`` (entries the demo claimed there).

    Args:
        out (Path): the demo's output folder; the runs' metric logs are read from ``out/<run>/logs``.
        heldout (Mapping): :func:`heldout_metrics.evaluate_heldout`'s result over ``teacher``, ``pruned`` and every
            checkpoint ``<run>@<step>`` of the two runs.
        lm_results (Mapping): lm-eval's results dict of ``teacher``, ``pruned``, ``ce_only`` and ``distilled``.
        ce_only (Sequence[tuple[int, Path]]): ``(global step, export folder)`` of the CE-only run's checkpoints.
        distilled (Sequence[tuple[int, Path]]): the same for the distilled run.
        total_steps (int): the steps both runs trained (their last checkpoint's step).
        num_layers (int): the pruned student's depth.
        seed (int): the runs' seed.
        lm_eval_limit (int): documents per lm-eval task.

    Returns:
        tuple[str, str, str, str]: the headline table, its note, the lm-eval check table and its note.
    """
    headline_keys = {"teacher": "teacher", "pruned": "pruned", "ce_only": f"ce_only@{total_steps}",
                     "distilled": f"distilled@{total_steps}"}
    steps_of = {"teacher": "–", "pruned": "0", "ce_only": str(total_steps), "distilled": str(total_steps)}
    rows, table_rows = [], []
    for name, key in headline_keys.items():
        metrics = heldout[key]
        row = {"model": name, "steps": steps_of[name], "heldout_ppl": metrics["perplexity"],
               "heldout_bpb": metrics["bits_per_byte"], "heldout_kl": metrics["kl_to_teacher"],
               "top1_agreement": metrics["top1_agreement"]}
        for task, metric in CHECK_METRICS:
            value, stderr = tables.extract_metric(lm_results[name], task, metric)
            row[f"{task}/{metric}"], row[f"{task}/{metric}_stderr"] = value, stderr
        rows.append(row)
        table_rows.append([name, steps_of[name], f"{row['heldout_ppl']:.2f}", f"{row['heldout_bpb']:.4f}",
                           f"{row['heldout_kl']:.4f}", f"{row['top1_agreement']:.4f}"])
    table = tables.markdown_table(
        ["model", "steps", "held-out ppl ↓", "bits/byte ↓", "held-out KL(teacher ‖ model) ↓", "top-1 agreement ↑"],
        table_rows)
    check_rows = []
    for row in rows:
        cells = [row["model"]]
        for key in (f"{task}/{metric}" for task, metric in CHECK_METRICS):
            stderr = row[f"{key}_stderr"]
            cells.append(f"{row[key]:.3f} ± {stderr:.3f}" if stderr is not None else f"{row[key]:.3f}")
        check_rows.append(cells)
    check = tables.markdown_table(["model", "truthfulqa_mc2 acc", "hellaswag acc_norm", "commonsense_qa acc"],
                                  check_rows)
    tokens = int(heldout["teacher"]["tokens"])
    note = (f"Held-out: {tokens} tokens of text no model trained on. KL is per token, in nats. Student: the teacher's "
            f"{num_layers} most influential layers; both recoveries ran {total_steps} steps with the same batches and "
            f"data order (seed {seed}).")
    check_note = ("Pipeline check, not evidence: lm-eval on the project's offline stand-in task files "
                  f"({lm_eval_limit} documents per task); ± is lm-eval's standard error.")
    (out / "results.md").write_text(table + "\n" + note + "\n\n" + check + "\n" + check_note + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves: dict[str, list[tuple[int, Mapping[str, float]]]] = {
        "ce_only": [(0, heldout["pruned"])], "distilled": [(0, heldout["pruned"])]}
    with open(out / "by_step.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "step", "heldout_ppl", "heldout_kl", "top1_agreement"])
        for run, exports in (("ce_only", ce_only), ("distilled", distilled)):
            for step, _ in [(0, None), *exports]:
                metrics = heldout["pruned" if step == 0 else f"{run}@{step}"]
                if step:
                    curves[run].append((step, metrics))
                writer.writerow([run, step, metrics["perplexity"], metrics["kl_to_teacher"], metrics["top1_agreement"]])
    plots.plot_metrics_by_step(curves, out / "heldout_by_step.png", HEADLINE_METRICS,
                               references={"teacher": heldout["teacher"]},
                               title=f"recovering the {num_layers}-layer pruned student: held-out metrics by step")
    runs = {name: run_logs.read_run_logs(out / name / "logs")[1] for name in ("distilled", "ce_only")}
    plots.plot_runs(runs, out / "loss_curves.png", metrics=("ce_loss", "kd_loss", "grad_norm"),
                    title="training losses (kd_loss: forward KL to the teacher, logged for both)")
    return table, note, check, check_note
