"""Whole-recipe benchmark: this project's recipe against torchtune 0.6.1's installed ``knowledge_distillation_single_device``.

Same random models (teacher 4 layers x 512, LoRA student 2 layers x 256, vocabulary ``--vocab``), same data (~256-token
samples built from the stand-in corpus), batch 4, the same number of steps, CPU fp32. Each variant is a fresh
``tune run`` process; variants are interleaved within each of ``--rounds`` rounds, and every ratio is taken against
upstream's run of the same round (these machines are noisy). Reported per variant: median over rounds of the median
label tokens/s after ``--warmup`` steps (each recipe's own logged figure), the largest peak RSS of the process
(``wait4``), and both as ratios to upstream.

Variants: ``upstream`` (torchtune's forward KL, kd_ratio 0.5); ``ours_fkl`` (our forward KL, kd_ratio 0.5, no IR);
``ours_seed`` (JSD + cosine IR on two layer pairs, manual scales 0.5/0.3/0.2: the seed's setup); each of ours also
``_fused`` (``fused_output.enabled=true``).

    python scripts/bench_recipe.py --vocab 128256 --rounds 3
    python scripts/bench_recipe.py --vocab 32000 --rounds 3

Every file goes under ``--workdir`` (default ``cache/bench_recipe``), which must be new, empty, or a folder this script
wrote (its marker file ``.torchtune_kd_outputs.json`` lists what it wrote; a rerun replaces its runs and reuses the
stand-ins); anything else is refused before anything is built. ``--json FILE`` names one file, never replaced unless
``--overwrite`` is given. A file this script did not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd import output_file, output_folder
from torchtune_kd.cli import checkout_dir
from torchtune_kd.testing.benchmarks import long_samples, run_once, runs_folder, shapes

OWNER = "scripts/bench_recipe.py"

VARIANTS = ["upstream", "ours_fkl", "ours_fkl_fused", "ours_seed", "ours_seed_fused"]
OURS_ONLY = ("layer_mapping", "ir_loss", "loss_scaling", "projection_lr_multiplier", "save_projections")


def configs(
    workdir: output_folder.OwnedFolder, vocab: int, steps: int, *, device: str = "cpu", dtype: str = "fp32",
    batch_size: int = 4, student_dim: int = 256, teacher_dim: int = 512,
) -> dict[str, tuple[str, Path]]:
    """Every variant's (recipe, config file), with random checkpoints written once; each entry of ``workdir`` is
    claimed before it is written."""
    import torch
    from omegaconf import OmegaConf

    from torchtune_kd.testing import standins
    from torchtune_kd.testing.recipes import LORA_OVERRIDES, tiny_config

    tag = f"v{vocab}_d{student_dim}-{teacher_dim}_{dtype}"
    workdir.claim("assets", "long_samples.json", f"student_{tag}", f"teacher_{tag}",
                  *(f"{variant}_v{vocab}.yaml" for variant in VARIANTS))
    root = workdir.path.resolve()
    assets = root / "assets"
    standins.build_all(assets)
    data = long_samples(assets, root / "long_samples.json")
    common = [
        *LORA_OVERRIDES, *shapes(vocab, student_dim, teacher_dim), f"dataset.data_files={data}", "tokenizer.max_seq_len=256",
        f"batch_size={batch_size}", f"device={device}", f"dtype={dtype}",
        "epochs=1", f"max_steps_per_epoch={steps}", "gradient_accumulation_steps=1", "seed=0", "shuffle=false",
        "lr_scheduler.num_warmup_steps=1", f"log_peak_memory_stats={str(device.startswith('cuda')).lower()}", "kd_ratio=0.5",
        "model.output_hidden_states=false", "teacher_model.output_hidden_states=false",
    ]
    probe = tiny_config(assets, root / "probe", common)  # only read: nothing is written to its output_dir
    folders = {"model": root / f"student_{tag}", "teacher_model": root / f"teacher_{tag}"}
    for seed, (key, folder) in enumerate(folders.items()):
        # The LoRA student's base weights (adapters are left out of the checkpoint).
        standins.write_random_checkpoint(probe[key], folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                         seed=seed)
    common += [f"checkpointer.checkpoint_dir={folders['model']}", f"teacher_checkpointer.checkpoint_dir={folders['teacher_model']}"]
    ours_fkl = ["layer_mapping=null", "loss_scaling.enabled=false", "kd_loss._component_=kd_losses.ForwardKLWithChunkedOutputLoss",
                "~kd_loss.lambda_weight"]
    fused = ["fused_output.enabled=true", "fused_output.chunk_size=256"]
    overrides = {
        "ours_fkl": ours_fkl, "ours_fkl_fused": [*ours_fkl, *fused],
        "ours_seed": ["model.output_hidden_states=true", "teacher_model.output_hidden_states=true"],
    }
    overrides["ours_seed_fused"] = [*overrides["ours_seed"], *fused]
    result: dict[str, tuple[str, Path]] = {}
    for variant in VARIANTS:
        out = root / "runs" / f"{variant}_v{vocab}"
        if variant == "upstream":
            cfg = tiny_config(assets, out, [*common, "kd_loss._component_=torchtune.modules.loss.ForwardKLWithChunkedOutputLoss",
                                            "~kd_loss.lambda_weight", f"metric_logger.log_dir={out / 'logs'}"])
            for key in OURS_ONLY:
                cfg.pop(key, None)
            for key in ("model", "teacher_model"):  # our recipe's flag; torchtune's builders do not take it
                cfg[key].pop("output_hidden_states", None)
            recipe = "knowledge_distillation_single_device"
        else:
            cfg = tiny_config(assets, out, [*common, *overrides[variant], "overwrite_output_dir=true",
                                            f"metric_logger.log_dir={out / 'logs'}"])
            recipe = "recipes/knowledge_distillation_single_device.py"
        path = root / f"{variant}_v{vocab}.yaml"
        OmegaConf.save(cfg, path)
        result[variant] = (recipe, path)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Every variant, ``--rounds`` times interleaved, then the table of medians and ratios; returns 0."""
    repo = checkout_dir()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput median")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=repo / "cache" / "bench_recipe",
                        help="every file goes here: a new, empty, or this script's own folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the measurements to this file (an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--teacher-dim", type=int, default=512)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if "upstream" not in variants:
        parser.error("--variants must include upstream, the baseline of every ratio")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    # Before anything is built: the report file, then the work folder.
    if args.json is not None:
        output_file.check_or_exit(args.json, option="--json", overwrite=args.overwrite)
    workdir = output_folder.claim_or_exit(args.workdir, owner=OWNER, option="--workdir")
    try:
        logs = [workdir.path_of(f"{variant}_v{args.vocab}.log") for variant in variants]
        run_dirs = runs_folder(workdir)
        run_dirs.claim(*(f"{variant}_v{args.vocab}" for variant in variants))
        runs = configs(workdir, args.vocab, args.steps, device=args.device, dtype=args.dtype,
                       batch_size=args.batch_size, student_dim=args.student_dim, teacher_dim=args.teacher_dim)
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    rounds: list[dict[str, dict]] = []
    for index in range(args.rounds):
        results = {}
        for variant in variants:
            recipe, config = runs[variant]
            results[variant] = run_once(recipe, config, args.warmup, logs[variants.index(variant)], run_dirs,
                                        checkout=repo)
            print(f"round {index + 1}: {variant}: {results[variant]}", flush=True)
        rounds.append(results)
    print(f"\n{args.device} {args.dtype}, {os.cpu_count()} cores, vocab {args.vocab}, teacher 4x{args.teacher_dim}, LoRA "
          f"student 2x{args.student_dim}, batch {args.batch_size} x ~256 tokens, {args.steps} steps (median after "
          f"{args.warmup}), {args.rounds} round(s), a fresh process per run; memory: peak RSS (host)")
    print("| variant | label tokens/s | × upstream (range) | peak RSS (MiB) | × upstream |")
    print("|---|---|---|---|---|")
    if "gpu_peak_alloc_gib" in rounds[0]["upstream"]:
        print("GPU peak allocated (GiB): " + ", ".join(
            f"{v} {max(r[v]['gpu_peak_alloc_gib'] for r in rounds):.2f}" for v in variants))
    for variant in variants:
        speed = statistics.median(r[variant]["tokens_per_second"] for r in rounds)
        ratios = sorted(r[variant]["tokens_per_second"] / r["upstream"]["tokens_per_second"] for r in rounds)
        rss = max(r[variant]["max_rss_mib"] for r in rounds)
        rss_ratio = statistics.median(r[variant]["max_rss_mib"] / r["upstream"]["max_rss_mib"] for r in rounds)
        print(f"| {variant} | {speed:.0f} | {statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) | "
              f"{rss:.0f} | {rss_ratio:.2f} |")
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k != "overwrite"}
        output_file.write(args.json, json.dumps({"settings": settings, "rounds": rounds}, indent=1), option="--json",
                          overwrite=args.overwrite)
    return 0

