"""Whole-recipe benchmark: this project's recipe against torchtune 0.6.1's installed ``knowledge_distillation_single_device``.

Same random models (teacher 4 layers x 512, LoRA student 2 layers x 256, vocabulary ``--vocabs``), same data (samples
of about ``--seq-len`` tokens built from the stand-in corpus), batch 4, the same number of steps, CPU fp32. Each
variant is a fresh ``tune run`` process; variants are interleaved within each of ``--rounds`` rounds, and every ratio
is taken against upstream's run of the same round (these machines are noisy). Reported per variant: median over
rounds of the median label tokens/s after ``--warmup`` steps (each recipe's own logged figure), the largest peak RSS
of the process (``wait4``; on CUDA also the GPU's peak allocation), and both as ratios to upstream.

Variants: ``upstream`` (torchtune's forward KL, kd_ratio 0.5); ``ours_fkl`` (our forward KL, kd_ratio 0.5, no IR);
``ours_seed`` (JSD + cosine IR on two layer pairs, manual scales 0.5/0.3/0.2: the seed's setup). Ours run with the
config defaults (``fused_output: {enabled: auto, chunk_size: auto}``: the fused pass, chunks of about vocab / hidden);
each also ``_unfused`` (``fused_output.enabled=false``: the path of a divergence without a hand-derived gradient).

    python scripts/bench_recipe.py --rounds 3                       # vocab 32000, 49152, 128256, 151936
    python scripts/bench_recipe.py --vocabs 49152 --seq-lens 128,256,512 --rounds 2 --variants upstream,ours_fkl,ours_seed
    python scripts/bench_recipe.py --rounds 3 --plot docs/bench_recipe_vocab.png

Every file goes under ``--workdir`` (default ``cache/bench_recipe``), which must be new, empty, or a folder this script
wrote (its marker file ``.torchtune_kd_outputs.json`` lists what it wrote; a rerun replaces its runs and reuses the
stand-ins); anything else is refused before anything is built. ``--json FILE`` and ``--plot FILE`` each name one file,
never replaced unless ``--overwrite`` is given. A file this script did not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

from torchtune_kd import output_file, output_folder
from torchtune_kd.cli import checkout_dir
from torchtune_kd.testing.benchmarks import long_samples, run_once, runs_folder, shapes

OWNER = "scripts/bench_recipe.py"

VARIANTS = ["upstream", "ours_fkl", "ours_fkl_unfused", "ours_seed", "ours_seed_unfused"]
OURS_ONLY = ("layer_mapping", "ir_loss", "loss_scaling", "projection_lr_multiplier", "save_projections",
             "fused_output")
DEFAULT_VOCABS = "32000,49152,128256,151936"
# Words per sample for a target length in tokens (the stand-in tokenizer: ~1.35 tokens per word).
WORDS_PER_TOKEN = 190 / 256


def point_tag(vocab: int, seq_len: int) -> str:
    return f"v{vocab}_s{seq_len}"


def configs(
    workdir: output_folder.OwnedFolder, vocab: int, steps: int, *, seq_len: int = 256, device: str = "cpu",
    dtype: str = "fp32", batch_size: int = 4, student_dim: int = 256, teacher_dim: int = 512, dry_run: bool = False,
) -> dict[str, tuple[str, Path]]:
    """Every variant's (recipe, config file) at one (vocabulary, sequence length), with random checkpoints written
    once (not with ``dry_run``); each entry of ``workdir`` is claimed before it is written."""
    import torch
    from omegaconf import OmegaConf

    from torchtune_kd.testing import standins
    from torchtune_kd.testing.recipes import LORA_OVERRIDES, tiny_config

    tag = f"v{vocab}_d{student_dim}-{teacher_dim}_{dtype}"
    point = point_tag(vocab, seq_len)
    samples = f"samples_s{seq_len}.json"
    workdir.claim("assets", samples, f"student_{tag}", f"teacher_{tag}", *(f"{variant}_{point}.yaml" for variant in VARIANTS))
    root = workdir.path.resolve()
    assets = root / "assets"
    standins.build_all(assets)
    data = long_samples(assets, root / samples, target_words=round(seq_len * WORDS_PER_TOKEN))
    common = [
        *LORA_OVERRIDES, *shapes(vocab, student_dim, teacher_dim), f"dataset.data_files={data}",
        f"tokenizer.max_seq_len={seq_len}", f"batch_size={batch_size}", f"device={device}", f"dtype={dtype}",
        "epochs=1", f"max_steps_per_epoch={steps}", "gradient_accumulation_steps=1", "seed=0", "shuffle=false",
        "lr_scheduler.num_warmup_steps=1", f"log_peak_memory_stats={str(device.startswith('cuda')).lower()}", "kd_ratio=0.5",
        "model.output_hidden_states=false", "teacher_model.output_hidden_states=false",
    ]
    probe = tiny_config(assets, root / "probe", common)  # only read: nothing is written to its output_dir
    folders = {"model": root / f"student_{tag}", "teacher_model": root / f"teacher_{tag}"}
    for seed, (key, folder) in enumerate(folders.items()):
        if dry_run or (folder / "model.safetensors").is_file():  # this script's own, for an earlier point
            continue
        # The LoRA student's base weights (adapters are left out of the checkpoint).
        standins.write_random_checkpoint(probe[key], folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                         seed=seed)
    common += [f"checkpointer.checkpoint_dir={folders['model']}", f"teacher_checkpointer.checkpoint_dir={folders['teacher_model']}"]
    ours_fkl = ["layer_mapping=null", "loss_scaling.enabled=false", "kd_loss._component_=kd_losses.ForwardKLWithChunkedOutputLoss",
                "~kd_loss.lambda_weight"]
    unfused = ["fused_output.enabled=false"]
    # Ours take the config's fused_output defaults (auto, auto): no override, so the table is the default path's.
    overrides = {
        "ours_fkl": ours_fkl, "ours_fkl_unfused": [*ours_fkl, *unfused],
        "ours_seed": ["model.output_hidden_states=true", "teacher_model.output_hidden_states=true"],
    }
    overrides["ours_seed_unfused"] = [*overrides["ours_seed"], *unfused]
    result: dict[str, tuple[str, Path]] = {}
    for variant in VARIANTS:
        out = root / "runs" / f"{variant}_{point}"
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
        path = root / f"{variant}_{point}.yaml"
        OmegaConf.save(cfg, path)
        result[variant] = (recipe, path)
    return result


def chunk_note(variant: str, vocab: int, seq_len: int, batch_size: int, student_dim: int) -> str:
    """The output pass a variant ran, with its chunk size (the auto size for a full batch of ``seq_len`` tokens)."""
    from torchtune_kd.core import fused_output

    if variant == "upstream":
        return "torchtune: 8 output chunks"
    if variant.endswith("_unfused"):
        return "unfused: 8 output chunks"
    return f"fused, auto: {fused_output.auto_chunk_size(batch_size * seq_len, vocab, student_dim)} tokens"


def summarise(rounds: list[dict[str, dict]], variants: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per variant: median tokens/s, median and range of its ratio to upstream, peak RSS and its median ratio."""
    summary = {}
    for variant in variants:
        ratios = sorted(r[variant]["tokens_per_second"] / r["upstream"]["tokens_per_second"] for r in rounds)
        summary[variant] = {
            "tokens_per_second": statistics.median(r[variant]["tokens_per_second"] for r in rounds),
            "speed_ratio": statistics.median(ratios), "speed_ratio_min": ratios[0], "speed_ratio_max": ratios[-1],
            "max_rss_mib": max(r[variant]["max_rss_mib"] for r in rounds),
            "rss_ratio": statistics.median(r[variant]["max_rss_mib"] / r["upstream"]["max_rss_mib"] for r in rounds),
        }
        if "gpu_peak_alloc_gib" in rounds[0][variant]:
            summary[variant]["gpu_peak_alloc_gib"] = max(r[variant]["gpu_peak_alloc_gib"] for r in rounds)
            summary[variant]["gpu_ratio"] = statistics.median(
                r[variant]["gpu_peak_alloc_gib"] / r["upstream"]["gpu_peak_alloc_gib"] for r in rounds)
    return summary


def table(point: dict[str, Any], variants: Sequence[str], args: argparse.Namespace) -> str:
    """One point's markdown table (chunk size stated per row)."""
    gpu = "gpu_ratio" in point["summary"]["upstream"]
    lines = [
        f"| variant | output pass | label tokens/s | × upstream (range) | peak RSS (MiB) | × upstream |"
        + (" GPU peak (GiB) | × upstream |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for variant in variants:
        row = point["summary"][variant]
        note = chunk_note(variant, point["vocab"], point["seq_len"], args.batch_size, args.student_dim)
        line = (f"| {variant} | {note} | {row['tokens_per_second']:.0f} | {row['speed_ratio']:.2f} "
                f"({row['speed_ratio_min']:.2f}–{row['speed_ratio_max']:.2f}) | {row['max_rss_mib']:.0f} | "
                f"{row['rss_ratio']:.2f} |")
        if gpu:
            line += f" {row['gpu_peak_alloc_gib']:.2f} | {row['gpu_ratio']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], variants: Sequence[str], path: Path, *, overwrite: bool, title: str) -> None:
    """Throughput and peak memory against vocabulary size (log axis) and, where several sequence lengths were run,
    against sequence length: one PNG, written by staging and renaming."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({p["vocab"] for p in points})
    seqs = sorted({p["seq_len"] for p in points})
    sweeps = []
    if len(vocabs) > 1:
        seq = max(seqs, key=lambda s: sum(p["seq_len"] == s for p in points))
        sweeps.append(("vocabulary size", "vocab", [p for p in points if p["seq_len"] == seq], True, f"~{seq} tokens/sample"))
    if len(seqs) > 1:
        vocab = max(vocabs, key=lambda v: sum(p["vocab"] == v for p in points))
        sweeps.append(("tokens per sample", "seq_len", [p for p in points if p["vocab"] == vocab], False, f"vocab {vocab:,}"))
    if not sweeps:
        sweeps.append(("vocabulary size", "vocab", points, True, ""))
    memory = "gpu_peak_alloc_gib" if "gpu_peak_alloc_gib" in points[0]["summary"]["upstream"] else "max_rss_mib"
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4 * len(sweeps)), squeeze=False)
    for row, (label, key, chosen, log_x, note) in enumerate(sweeps):
        chosen = sorted(chosen, key=lambda p: p[key])
        xs = [p[key] for p in chosen]
        for variant in variants:
            style = "k--" if variant == "upstream" else ("-o" if not variant.endswith("_unfused") else ":s")
            axes[row][0].plot(xs, [p["summary"][variant]["tokens_per_second"] for p in chosen], style, label=variant)
            axes[row][1].plot(xs, [p["summary"][variant][memory] for p in chosen], style, label=variant)
        for col, ylabel in enumerate(("label tokens / s", "peak GPU memory (GiB)" if memory != "max_rss_mib" else "peak RSS (MiB)")):
            axis = axes[row][col]
            if log_x:
                axis.set_xscale("log")
            axis.set_xticks(xs, [f"{x:,}" for x in xs], rotation=30 if log_x else 0)
            axis.minorticks_off()
            axis.set_xlabel(f"{label} ({note})" if note else label)
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)  # the settings line is longer than the figure is wide
    fig.tight_layout()
    with output_file.staged(path, option="--plot", overwrite=overwrite) as staging:
        fig.savefig(staging, format="png", dpi=110)
    plt.close(fig)


def dry_run(runs: dict, variants: Sequence[str], args: argparse.Namespace) -> int:
    """Check every config of the matrix without running it: ours through the pre-flight (models on the meta device,
    no files), upstream's for the keys torchtune's recipe reads; print the output pass each of ours would take."""
    from omegaconf import OmegaConf

    from torchtune_kd.core import preflight

    checked = 0
    for (vocab, seq_len), by_variant in runs.items():
        for variant in variants:
            recipe, path = by_variant[variant]
            cfg = OmegaConf.load(path)
            if variant == "upstream":
                missing = [key for key in ("model", "teacher_model", "kd_loss", "loss", "dataset") if key not in cfg]
                if missing or "fused_output" in cfg:
                    raise SystemExit(f"error: {path}: upstream's config lacks {missing} or carries our keys")
            else:
                facts = preflight.validate_config(cfg, check_files=False, check_device=False)
                print(f"vocab {vocab}, ~{seq_len} tokens, {variant}: "
                      f"{next(n for n in facts.notices if n.startswith('Output pass: '))}")
            checked += 1
    rounds_runs = checked * args.rounds
    print(f"dry run: {checked} configs checked ({rounds_runs} runs of {args.steps} steps with --rounds {args.rounds})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Every variant at every point, ``--rounds`` times interleaved, then a table per point; returns 0."""
    repo = checkout_dir()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--vocabs", default=DEFAULT_VOCABS, help="vocabulary sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=None, help="one vocabulary size (instead of --vocabs)")
    parser.add_argument("--seq-lens", default="256",
                        help="tokens per sample, comma-separated; with several, each is run at every --vocabs size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput median")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=repo / "cache" / "bench_recipe",
                        help="every file goes here: a new, empty, or this script's own folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the measurements to this file (an existing file only with --overwrite)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="draw throughput and peak memory against vocabulary size (and sequence length) to this PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json / --plot file if it exists")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--teacher-dim", type=int, default=512)
    parser.add_argument("--dry-run", action="store_true",
                        help="write every config and check ours with the pre-flight (models on the meta device); no "
                             "checkpoint is written and nothing runs")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if "upstream" not in variants:
        parser.error("--variants must include upstream, the baseline of every ratio")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    try:
        vocabs = [args.vocab] if args.vocab is not None else [int(v) for v in args.vocabs.split(",") if v]
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    except ValueError:
        parser.error(f"--vocabs {args.vocabs!r} and --seq-lens {args.seq_lens!r} must be comma-separated integers")
    if not vocabs or not seq_lens or min(vocabs + seq_lens) < 1:
        parser.error("--vocabs and --seq-lens need at least one positive size each")
    points = [(vocab, seq) for seq in seq_lens for vocab in vocabs]
    # Before anything is built: the report files, then the work folder.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            output_file.check_or_exit(path, option=option, overwrite=args.overwrite)
    workdir = output_folder.claim_or_exit(args.workdir, owner=OWNER, option="--workdir")
    try:
        run_dirs = runs_folder(workdir)
        run_dirs.claim(*(f"{variant}_{point_tag(*point)}" for point in points for variant in variants))
        workdir.claim(*(f"{variant}_{point_tag(*point)}.log" for point in points for variant in variants))
        runs = {point: configs(workdir, point[0], args.steps, seq_len=point[1], device=args.device, dtype=args.dtype,
                               batch_size=args.batch_size, student_dim=args.student_dim, teacher_dim=args.teacher_dim,
                               dry_run=args.dry_run)
                for point in points}
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    if args.dry_run:
        return dry_run(runs, variants, args)
    header = (f"{args.device} {args.dtype}, {os.cpu_count()} cores, teacher 4x{args.teacher_dim}, LoRA student "
              f"2x{args.student_dim}, batch {args.batch_size}, {args.steps} steps (median after {args.warmup}), "
              f"{args.rounds} round(s), a fresh process per run, ratios to upstream in the same round; memory: peak RSS "
              "(host)" + (" and GPU peak allocation" if args.device.startswith("cuda") else ""))
    results = []
    for vocab, seq_len in points:
        rounds: list[dict[str, dict]] = []
        for index in range(args.rounds):
            measured = {}
            for variant in variants:
                recipe, config = runs[(vocab, seq_len)][variant]
                log = workdir.path_of(f"{variant}_{point_tag(vocab, seq_len)}.log")
                measured[variant] = run_once(recipe, config, args.warmup, log, run_dirs, checkout=repo)
                print(f"vocab {vocab}, ~{seq_len} tokens, round {index + 1}: {variant}: {measured[variant]}", flush=True)
            rounds.append(measured)
        point = {"vocab": vocab, "seq_len": seq_len, "rounds": rounds, "summary": summarise(rounds, variants)}
        results.append(point)
        print(f"\n{header}\nvocab {vocab:,}, samples of ~{seq_len} tokens\n{table(point, variants, args)}\n", flush=True)
    if len(results) > 1:
        print(f"## all points\n\n{header}\n")
        for point in results:
            print(f"vocab {point['vocab']:,}, samples of ~{point['seq_len']} tokens\n{table(point, variants, args)}\n")
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k != "overwrite"}
        output_file.write(args.json, json.dumps({"settings": settings, "points": results}, indent=1), option="--json",
                          overwrite=args.overwrite)
    if args.plot:
        plot(results, variants, args.plot, overwrite=args.overwrite, title=header)
        print(f"plot: {args.plot}")
    return 0
