#!/usr/bin/env python
"""Divergence x IR x seed grid through the real recipe; mean ± standard error and paired Δ vs a CE-only baseline.

Examples:
    # the README's CPU grid on the tiny stand-ins (a pre-trained tiny teacher), ~20 min on 2 cores
    python scripts/experiment.py --tiny --divergences forward_kl,reverse_kl,jsd,tvd --ir off --seeds 0,1,2 \
        --steps 40 --out outputs/experiment_tiny
    # the real 3B -> 1B grid on a GPU: same script, the real config
    python scripts/experiment.py --config configs/distillation.yaml --heldout my_heldout.txt --steps 500 \
        --divergences forward_kl,reverse_kl,symmetric_kl,jsd,tvd,skew_kl --ir off,cosine --seeds 0,1,2

Finished cells (``<out>/cells/<cell>/result.json``) are skipped: rerun the same command to resume.

``--out`` must be new, empty, or a folder this script wrote (its marker file ``.torchtune_kd_outputs.json`` lists
what it wrote): that is how a rerun resumes there. ``--assets`` (``--tiny``) must be new, empty or a stand-ins folder,
``--teacher-cache`` new, empty or a teacher cache. Anything else is refused before the stand-ins are built or a
model is loaded, and a file this script did not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from torchtune_kd import experiment, output_folder, tune_cli
from torchtune_kd.evaluation import heldout_metrics

# The checkout this script lives in: `tune run` needs the recipe file and must run from the checkout root, where
# torchtune imports the recipe as `recipes.<name>`.
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "knowledge_distillation_single_device.py"
OWNER = "scripts/experiment.py"
# The owners of the folders this script has other commands write: the stand-ins and the teacher-cache pre-pass.
STANDINS_OWNER = "torchtune_kd.testing.standins"
CACHE_OWNER = "recipes/cache_teacher.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="build the tiny stand-ins (pre-trained tiny teacher) and use them")
    parser.add_argument("--assets", type=Path, default=REPO / "cache" / "tiny_experiment",
                        help="stand-ins folder for --tiny (new, empty, or stand-ins built before: reused)")
    parser.add_argument("--teacher-pretrain-steps", type=int, default=150)
    parser.add_argument("--divergences", default="forward_kl,reverse_kl,jsd,tvd")
    parser.add_argument("--ir", default="off", help="comma list of off,cosine")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (max_steps_per_epoch)")
    parser.add_argument("--mapping", default="auto", help="layer mapping when IR is on")
    parser.add_argument("--scales", default="0.5,0.3,0.2", help="ce,kd,ir weights of the KD runs")
    parser.add_argument("--heldout", type=Path, default=None, help="held-out text (default: the stand-ins' heldout.txt)")
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "experiment",
                        help="the grid's folder: new, empty, or this script's own (a rerun resumes it)")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="run the teacher once into this cache (recipes/cache_teacher.py) and distil every cell "
                             "without IR from it (cells with IR run the teacher live)")
    parser.add_argument("--cache-top-k", type=int, default=64, help="k of the teacher cache (--teacher-cache)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return parser.parse_args(argv)


def claim_folders(args: argparse.Namespace) -> output_folder.OwnedFolder:
    """Check every folder this run writes, then claim ``--out``; exit with the first problem (before any heavy work)."""
    problems = []
    if args.tiny:
        # The stand-ins module claims its folder itself; checked here so that its refusal comes before --out is made.
        problems += output_folder.check(args.assets, owner=STANDINS_OWNER, option="--assets")
    if args.teacher_cache is not None:
        problems += output_folder.check(args.teacher_cache, owner=CACHE_OWNER, option="--teacher-cache")
    if problems:
        sys.exit(f"error: {problems[0]}")
    return output_folder.claim_or_exit(args.out, owner=OWNER, option="--out")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: --seeds={args.seeds!r} must be comma-separated integers, e.g. 0,1,2")
    try:
        cells = experiment.grid([d for d in args.divergences.split(",") if d], [i for i in args.ir.split(",") if i], seeds)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.heldout is None and not args.tiny:
        sys.exit("error: --heldout is required without --tiny (the stand-ins bring their own held-out text)")
    out = claim_folders(args)
    out.claim("command.txt", "cells", "results.csv", "summary.csv", "summary.md")
    env = {}
    heldout = args.heldout
    if args.tiny:
        from torchtune_kd.testing import standins

        print(f"[experiment] building tiny stand-ins in {args.assets} (teacher pre-trained {args.teacher_pretrain_steps} steps)")
        manifest = standins.build_all(args.assets, teacher_pretrain_steps=args.teacher_pretrain_steps, option="--assets")
        env["KD_ASSETS"] = manifest["root"]
        os.environ["KD_ASSETS"] = manifest["root"]
        heldout = heldout or Path(manifest["data"]["heldout_text"])

    base = OmegaConf.load(args.config)
    base = OmegaConf.merge(base, OmegaConf.from_dotlist([o for o in args.overrides if not o.startswith("~")]))
    teacher_dir = Path(str(base.teacher_checkpointer.checkpoint_dir))
    chunked = str(base.kd_loss._component_).endswith("WithChunkedOutputLoss")
    base_kd_keys = [k for k in base.kd_loss.keys() if k != "_component_"]
    ce, kd, ir = (float(x) for x in args.scales.split(","))

    shown = sys.argv if argv is None else [sys.argv[0], *argv]
    (args.out / "command.txt").write_text(" ".join(shown) + "\n")
    cache = None
    if args.teacher_cache is not None:
        cache = str(args.teacher_cache.resolve())
        started = time.time()
        print(f"[experiment] teacher cache {cache} (k={args.cache_top_k}): one pre-pass for the whole grid ...", flush=True)
        result = tune_cli.tune_run(
            "recipes/cache_teacher.py", args.config,
            [f"teacher_cache.path={cache}", f"teacher_cache.top_k={args.cache_top_k}", *args.overrides],
            cwd=REPO, env=env,
        )
        out.path_of("teacher_cache.log").write_text(result.stdout or "")
        if result.returncode != 0:
            sys.exit(f"the teacher-cache pre-pass failed (exit {result.returncode}); see {args.out / 'teacher_cache.log'}")
        print(f"[experiment]   cache ready ({time.time() - started:.0f} s)")
    rows = []
    for index, cell in enumerate(cells, 1):
        cell_dir = args.out / "cells" / cell.name
        result = experiment.load_result(cell_dir)
        if result is not None:
            print(f"[experiment] {index}/{len(cells)} {cell.name}: done before, skipped")
            rows.append(result)
            continue
        overrides = experiment.cell_overrides(
            cell, chunked=chunked, mapping=args.mapping, scales={"ce": ce, "kd": kd, "ir": ir}, base_kd_keys=base_kd_keys,
            teacher_cache=cache,
        )
        overrides += [f"max_steps_per_epoch={args.steps}", "epochs=1", f"metric_logger.log_dir={cell_dir / 'run' / 'logs'}"]
        overrides += list(args.overrides)
        started = time.time()
        print(f"[experiment] {index}/{len(cells)} {cell.name}: training {args.steps} steps ...", flush=True)
        cell_dir.mkdir(parents=True, exist_ok=True)
        export = experiment.run_cell(
            cell, recipe=RECIPE, workdir=REPO, config=args.config, out_dir=cell_dir / "run", overrides=overrides,
            env=env, log_file=cell_dir / "train.log",
        )
        metrics = heldout_metrics.evaluate_heldout(
            {"student": export, "teacher": teacher_dir}, heldout, teacher="teacher",
            seq_len=args.eval_seq_len, max_windows=args.eval_windows,
        )["student"]
        result = {"cell": cell.name, "setting": cell.setting, "divergence": cell.divergence, "ir": cell.ir,
                  "seed": cell.seed, "heldout_ppl": metrics["perplexity"], "heldout_nll": metrics["nll"],
                  "heldout_kl": metrics["kl_to_teacher"], "top1_agreement": metrics["top1_agreement"], "seconds": round(time.time() - started, 1),
                  "teacher": "cache" if cache is not None and experiment.uses_cache(cell) else "live"}
        (cell_dir / "result.json").write_text(json.dumps(result, indent=2))
        rows.append(result)
        print(f"[experiment]   ppl {result['heldout_ppl']:.3f}  KL to teacher {result['heldout_kl']:.4f}  agreement "
              f"{result['top1_agreement']:.4f}  ({result['seconds']} s)")
        # The run's training state (optimiser, weights) is not needed once evaluated. The run is this grid's own: it
        # lies inside the cells/ entry this script claimed.
        state = cell_dir / "run" / "training_state"
        if state.exists():
            import shutil

            shutil.rmtree(state)

    experiment.write_rows(args.out / "results.csv", rows)
    # Older results (before the KL metric) lack heldout_kl: summarise it only when every cell has it.
    metrics = ["heldout_ppl", "heldout_kl", "top1_agreement"] if all("heldout_kl" in r for r in rows) else ["heldout_ppl", "top1_agreement"]
    summary = experiment.summarise(rows, metrics)
    table = experiment.markdown_table(summary, metrics)
    experiment.write_rows(args.out / "summary.csv", summary)
    print("\n" + table)
    note = ("n = seeds; ± = standard error over seeds; Δ is paired by seed (same data order) against ce_only; "
            "* marks a paired t-test significant at 95% (|Δ| > t(n-1) · se, i.e. 4.3 se for 3 seeds).")
    print(note)
    text = table + "\n" + note + "\n"
    effects = experiment.ir_effect(rows, metrics)
    if effects:
        ir_table = experiment.difference_table(effects, metrics, "divergence", "IR on − off")
        ir_note = "What cosine IR adds to each divergence: <divergence>+ir_cosine − <divergence>+ir_off, paired by seed."
        if any(r.get("teacher") == "cache" for r in rows):
            ir_note += (" Caution: here the cells without IR read the teacher cache and the IR cells ran the teacher live, "
                        "so this mixes IR with the cache's top-k coarsening (run without --teacher-cache to separate them).")
        print("\n" + ir_table + ir_note)
        text += "\n" + ir_table + "\n" + ir_note + "\n"
    (args.out / "summary.md").write_text(text)


if __name__ == "__main__":
    main()
