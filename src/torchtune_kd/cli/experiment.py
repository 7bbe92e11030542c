"""Divergence x IR x seed grid through the real recipe; mean ± standard error and paired Δ vs a CE-only baseline.

A divergence written ``name@fraction`` (e.g. ``reverse_kl@0.5``) runs on-policy on that share of the steps
(``on_policy.fraction``); the grid then also compares each on-policy setting with off-policy forward KL, paired by
seed, and ``--onpolicy-eval-data`` adds the on-policy held-out metrics (the student's own samples from held-out
prompts, scored by the teacher).

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
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd import experiment, output_folder
from torchtune_kd.cli import checkout_dir

# The recipe every cell runs, relative to the checkout: `tune run` imports it there as `recipes.<name>`.
RECIPE = Path("recipes") / "knowledge_distillation_single_device.py"
OWNER = "scripts/experiment.py"
# The owners of the folders this script has other commands write: the stand-ins and the teacher-cache pre-pass.
STANDINS_OWNER = "torchtune_kd.testing.standins"
CACHE_OWNER = "recipes/cache_teacher.py"


def parse_args(argv: Optional[Sequence[str]] = None, *, repo: Path) -> argparse.Namespace:
    """The command line; ``repo`` (the checkout) gives the default paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--config", type=Path, default=repo / "configs" / "tiny_cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="build the tiny stand-ins (pre-trained tiny teacher) and use them")
    parser.add_argument("--assets", type=Path, default=repo / "cache" / "tiny_experiment",
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
    parser.add_argument("--out", type=Path, default=repo / "outputs" / "experiment",
                        help="the grid's folder: new, empty, or this script's own (a rerun resumes it)")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="run the teacher once into this cache (recipes/cache_teacher.py) and distil every cell "
                             "without IR from it (cells with IR run the teacher live)")
    parser.add_argument("--cache-top-k", type=int, default=64, help="k of the teacher cache (--teacher-cache)")
    parser.add_argument("--onpolicy-eval-data", type=Path, default=None,
                        help="also report the on-policy held-out metrics on the prompts of this data file (the "
                             "dataset's format, e.g. the demo's text/validation.json)")
    parser.add_argument("--onpolicy-eval-prompts", type=int, default=16, help="held-out prompts (default %(default)s)")
    parser.add_argument("--onpolicy-eval-new-tokens", type=int, default=48,
                        help="tokens the student samples per prompt (default %(default)s)")
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
    """Check the arguments and folders, build the stand-ins (``--tiny``), run the grid and write its summary."""
    repo = checkout_dir()
    args = parse_args(argv, repo=repo)
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

    ce, kd, ir = (float(x) for x in args.scales.split(","))
    shown = sys.argv if argv is None else [sys.argv[0], *argv]
    rows = experiment.run_grid(
        cells, out, checkout=repo, recipe=repo / RECIPE, config=args.config, overrides=args.overrides,
        command=" ".join(shown), steps=args.steps, mapping=args.mapping, scales={"ce": ce, "kd": kd, "ir": ir},
        heldout=heldout, eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows, env=env,
        teacher_cache=args.teacher_cache, cache_top_k=args.cache_top_k,
        onpolicy_eval=None if args.onpolicy_eval_data is None else {
            "data": args.onpolicy_eval_data, "prompts": args.onpolicy_eval_prompts,
            "max_new_tokens": args.onpolicy_eval_new_tokens, "seed": 0,
        },
    )
    experiment.write_summary(args.out, rows)
