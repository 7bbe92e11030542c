"""Teacher-cache benchmark: pre-pass cost, cache size, cached vs live epoch time and memory, and k = 64 quality.

What it measures (the "teacher cache" issue's requirements), in two parts (``--part speed``, ``--part quality``;
both by default):

**speed** — random-weight Llama models on CPU fp32, the stand-in tokenizer's 1280-token vocabulary, a full
fine-tune student (2 layers x ``--student-dim``) and a teacher about 4x its parameter count (``--teacher-layers`` x
``--teacher-dim``; both counts and the ratio are printed, computed from the configs on the meta device). Data:
~256-token samples (``torchtune_kd.testing.benchmarks.long_samples``), batch 4, no shuffling, forward KL, no IR, ``kd_ratio`` 0.5. The
dataset is cut to ``--steps`` x batch samples (``dataset.split=train[:N]``) so that one epoch covers every sample,
exactly what the pre-pass covers.

* Pre-pass (``recipes/cache_teacher.py``) for each k of ``--ks`` (16, 64, 256; fp16 log-probabilities), each into
  a fresh folder: the process's wall time, the manifest's in-process ``prepass_seconds``, both per 1000 cached
  tokens, the manifest's token rows, size and bytes per token.
* One live epoch (teacher run every step) and one cached epoch (``teacher_cache.path`` = the k = ``--cached-k``
  cache; the teacher is never built) per round, as fresh ``tune run`` processes, interleaved within each of
  ``--rounds`` rounds (these machines are noisy: every ratio is taken within a round). Epoch time = the sum over
  steps of (the step's label tokens / its logged ``tokens_per_second``), i.e. the recipe's own per-step timer
  (data loading, cache look-up, forward, backward, optimiser); the label tokens of each step are the cache's rows
  of that step's samples (the pre-pass counts exactly the tokens the loss counts). The first step is a warm-up and
  is left out of both runs' sums. Peak memory: the process's peak RSS (``os.wait4``), printed next to the size of
  the teacher's fp32 weights, which the cached run never loads.

**quality** — the tiny experiment (pre-trained tiny teacher), k = 64 against the live teacher:
``scripts/experiment.py --tiny --divergences forward_kl --ir off`` live, and again with ``--teacher-cache``, then
per setting (``ce_only``, ``forward_kl+ir_off``) mean ± standard error over seeds of held-out perplexity and top-1
agreement with the teacher, and the paired (same seed) difference cached − live. ``ce_only`` has KD weight 0, so
the cache cannot change it: its Δ is a sanity check (≈ 0).

Commands::

    python scripts/bench_cache.py                      # both parts, defaults below (~10 min on 2 idle cores)
    python scripts/bench_cache.py --part speed --steps 16 --rounds 3 --ks 16,64,256
    python scripts/bench_cache.py --part quality --seeds 0,1,2 --quality-steps 40
    python scripts/bench_cache.py --smoke --workdir /tmp/bench_cache   # tiny and fast: checks the script runs

How to read the output: the exact command comes first. "pre-pass" rows: cost per 1000 tokens and bytes per token
for each k. "epoch" rows: per round, the live and cached epoch seconds and cached / live (the issue asks for
≤ 0.5), with the median over rounds last; peak RSS of both and their ratio. "quality" rows: live and cached mean ±
se and Δ (cached − live) ± se, with ``*`` where a paired t-test at 95% rejects Δ = 0 (needs ≥ 2 seeds). Everything
is also written to ``<workdir>/results.json``. All files go under ``--workdir`` (default ``cache/bench_cache``), which
must be new, empty, or a folder this script wrote (its marker file ``.torchtune_kd_outputs.json`` lists what it
wrote); anything else is refused before anything is built. A rerun removes that folder's previous runs, caches and
experiment outputs (the stand-ins and random checkpoints are reused: they are deterministic); a file this script did
not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from torchtune_kd import output_folder
from torchtune_kd.cli import checkout_dir
# Shapes, long samples, one fresh `tune run` measured (shared with scripts/bench_recipe.py).
from torchtune_kd.testing import benchmarks

OWNER = "scripts/bench_cache.py"

RECIPE = "recipes/knowledge_distillation_single_device.py"
PREPASS = "recipes/cache_teacher.py"
VOCAB = 1280  # the tiny stand-in tokenizer's vocabulary
# Forward KL, no IR (a cache holds no hidden states), torchtune's kd_ratio blend.
FORWARD_KL_NO_IR = [
    "layer_mapping=null", "loss_scaling.enabled=false", "kd_loss._component_=kd_losses.ForwardKLWithChunkedOutputLoss",
    "~kd_loss.lambda_weight", "kd_ratio=0.5", "model.output_hidden_states=false", "teacher_model.output_hidden_states=false",
]
# Smoke mode: every knob small (these replace the flags' values), so that each part runs in well under a minute.
SMOKE = {"steps": 3, "rounds": 1, "ks": "4,8", "cached_k": 8, "seeds": "0", "quality_steps": 2, "pretrain_steps": 0,
         "eval_windows": 2}


# ------------------------------------------------------------------------------------------------------- speed


def parameter_count(cfg_model: Any) -> int:
    """Parameters of the model a config section builds (on the meta device: nothing is allocated)."""
    import torch
    from torchtune import config

    from torchtune_kd.core import models

    plain, _ = models.model_config_without_flag(cfg_model)
    with torch.device("meta"):
        model = config.instantiate(plain)
    return sum(p.numel() for p in model.parameters())


def speed_tag(args: argparse.Namespace) -> str:
    """The shapes in the names of the random checkpoints' folders."""
    return f"v{VOCAB}_s2x{args.student_dim}_t{args.teacher_layers}x{args.teacher_dim}"


def speed_configs(workdir: output_folder.OwnedFolder, args: argparse.Namespace) -> dict[str, Any]:
    """Write the live config, the cached config and the random checkpoints (each entry of ``workdir`` claimed
    first); return paths and model sizes.

    Returns:
        dict: ``live`` / ``cached`` config paths, ``samples`` (the dataset's size = one epoch), ``student_params``,
        ``teacher_params`` and ``cache_dirs`` (k -> folder).
    """
    import torch
    from omegaconf import OmegaConf

    from torchtune_kd.testing import standins
    # Configs built by torchtune's own command-line code, so each one is a config a user could type.
    from torchtune_kd.testing.recipes import tiny_config

    tag = speed_tag(args)
    workdir.claim("assets", "long_samples.json", f"student_{tag}", f"teacher_{tag}", "live.yaml", "cached.yaml")
    root = workdir.path.resolve()
    assets = root / "assets"
    standins.build_all(assets)
    data = benchmarks.long_samples(assets, root / "long_samples.json")
    available = len(json.loads(data.read_text()))
    samples = args.steps * args.batch_size
    if samples > available:
        raise SystemExit(f"--steps {args.steps} x batch {args.batch_size} = {samples} samples, but the long-sample "
                         f"data has {available}: use --steps <= {available // args.batch_size}")
    common = [
        *benchmarks.shapes(VOCAB, args.student_dim, args.teacher_dim), f"teacher_model.num_layers={args.teacher_layers}",
        f"dataset.data_files={data}", f"dataset.split=train[:{samples}]", "tokenizer.max_seq_len=256",
        f"batch_size={args.batch_size}", "device=cpu", "dtype=fp32", "epochs=1", f"max_steps_per_epoch={args.steps}",
        "gradient_accumulation_steps=1", "seed=0", "shuffle=false", "lr_scheduler.num_warmup_steps=1",
        "log_peak_memory_stats=false", *FORWARD_KL_NO_IR,
    ]
    probe = tiny_config(assets, root / "probe", common)  # only read: nothing is written to its output_dir
    student_params, teacher_params = parameter_count(probe.model), parameter_count(probe.teacher_model)
    folders = {"model": root / f"student_{tag}", "teacher_model": root / f"teacher_{tag}"}
    for seed, (key, folder) in enumerate(folders.items()):
        standins.write_random_checkpoint(probe[key], folder, dtype=torch.float32, seed=seed)
    common += [f"checkpointer.checkpoint_dir={folders['model']}",
               f"teacher_checkpointer.checkpoint_dir={folders['teacher_model']}", "overwrite_output_dir=true"]
    cache_dirs = {k: root / "caches" / f"top{k}" for k in args.k_list}
    result: dict[str, Any] = {"samples": samples, "student_params": student_params, "teacher_params": teacher_params,
                              "cache_dirs": cache_dirs}
    for name, extra in (("live", []), ("cached", [f"teacher_cache.path={cache_dirs[args.cached_k]}",
                                                   f"teacher_cache.top_k={args.cached_k}"])):
        out = root / "runs" / name
        cfg = tiny_config(assets, out, [*common, *extra, f"metric_logger.log_dir={out / 'logs'}"])
        result[name] = root / f"{name}.yaml"
        OmegaConf.save(cfg, result[name])
    return result


def run_prepass(
    config: Path, caches: output_folder.OwnedFolder, cache_dir: Path, k: int, log: Path, *, checkout: Path
) -> dict[str, float]:
    """One pre-pass as a fresh ``tune run`` in the checkout ``checkout`` into ``cache_dir`` (an entry of ``caches``,
    emptied first); its wall time and the manifest's totals."""
    from torchtune_kd import tune_cli
    from torchtune_kd.core import teacher_cache

    # Our own cache from an earlier pre-pass: a complete cache would make the pre-pass a no-op.
    caches.claim(cache_dir.name)
    caches.remove(cache_dir.name)
    overrides = [f"teacher_cache.path={cache_dir}", f"teacher_cache.top_k={k}", "teacher_cache.dtype=float16"]
    started = time.perf_counter()
    with log.open("w") as sink:
        done = tune_cli.tune_run(PREPASS, config, overrides, cwd=checkout, env={"WANDB_MODE": "offline"},
                                 stdout=sink)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pre-pass k={k} failed (exit {done.returncode}); see {log}")
    manifest = teacher_cache.read_manifest(cache_dir)
    return {"k": k, "wall_seconds": wall, "prepass_seconds": float(manifest["prepass_seconds"]),
            "num_rows": int(manifest["num_rows"]), "bytes": int(manifest["bytes"]),
            "bytes_per_token": float(manifest["bytes_per_token"])}


def tokens_per_step(cache_dir: Path, steps: int, batch_size: int) -> list[int]:
    """Label tokens of each step of an unshuffled epoch: the cache's rows of that step's samples.

    The pre-pass stores one row per counted token (shifted label != ignore_index), the loss's count; with
    ``shuffle=false`` step ``s`` (from 1) takes samples ``[(s - 1) * batch, s * batch)``.
    """
    from torchtune_kd.core import teacher_cache

    cache = teacher_cache.TeacherCache(cache_dir)
    rows = [int(cache.item_rows(i)["log_tail"].shape[0]) for i in range(steps * batch_size)]
    return [sum(rows[s * batch_size:(s + 1) * batch_size]) for s in range(steps)]


def epoch_seconds(run_dir: Path, step_tokens: Sequence[int], warmup: int) -> float:
    """Sum of per-step seconds (label tokens / logged tokens per second) after the first ``warmup`` steps."""
    from torchtune_kd.evaluation import run_logs

    rates = dict(run_logs.read_disk_log(run_dir / "logs")["tokens_per_second"])
    if sorted(rates) != list(range(1, len(step_tokens) + 1)):
        raise SystemExit(f"{run_dir}: logged steps {sorted(rates)} are not 1..{len(step_tokens)}")
    return sum(step_tokens[step - 1] / rates[step] for step in rates if step > warmup)


def measure_speed(workdir: output_folder.OwnedFolder, args: argparse.Namespace, *, checkout: Path) -> dict[str, Any]:
    """Pre-pass per k, then live and cached epochs interleaved per round (see the module docstring), in the
    checkout ``checkout``."""
    from omegaconf import OmegaConf

    workdir.claim("runs", "caches", "logs")
    for name in ("runs", "caches", "logs"):  # this benchmark's own outputs from an earlier run
        workdir.remove(name)
    logs = workdir.path.resolve() / "logs"
    logs.mkdir()
    runs = benchmarks.runs_folder(workdir)
    runs.claim("live", "cached")  # before the pre-pass, which writes into the live config's output_dir too
    caches = output_folder.claim_output_folder(workdir.path / "caches", owner=OWNER, option="--workdir")
    setup = speed_configs(workdir, args)
    ratio = setup["teacher_params"] / setup["student_params"]
    print(f"student {setup['student_params']:,} parameters (2 x {args.student_dim}, full fine-tune), teacher "
          f"{setup['teacher_params']:,} ({args.teacher_layers} x {args.teacher_dim}): teacher / student = {ratio:.2f}",
          flush=True)
    prepass = []
    for k in args.k_list:
        prepass.append(run_prepass(setup["live"], caches, setup["cache_dirs"][k], k, logs / f"prepass_top{k}.log",
                                   checkout=checkout))
        print(f"pre-pass k={k}: {prepass[-1]}", flush=True)
    step_tokens = tokens_per_step(setup["cache_dirs"][args.cached_k], args.steps, args.batch_size)
    rounds = []
    for index in range(args.rounds):
        result = {}
        for name in ("live", "cached"):
            measured = benchmarks.run_once(RECIPE, setup[name], args.warmup, logs / f"{name}_round{index + 1}.log", runs,
                                           checkout=checkout)
            run_dir = Path(OmegaConf.load(setup[name]).output_dir)
            result[name] = {"epoch_seconds": epoch_seconds(run_dir, step_tokens, args.warmup),
                            "max_rss_mib": measured["max_rss_mib"]}
            print(f"round {index + 1}: {name}: {result[name]}", flush=True)
        rounds.append(result)
    return {"student_params": setup["student_params"], "teacher_params": setup["teacher_params"],
            "teacher_weights_mib": setup["teacher_params"] * 4 / 2**20, "samples": setup["samples"],
            "epoch_tokens": sum(step_tokens[args.warmup:]), "prepass": prepass, "rounds": rounds}


def speed_report(speed: dict[str, Any], args: argparse.Namespace) -> str:
    """Markdown: the pre-pass table and the epoch table (per round, then the median of the ratios)."""
    lines = [
        f"\n### speed: CPU fp32, {os.cpu_count()} cores, vocab {VOCAB}, student 2 x {args.student_dim} "
        f"({speed['student_params']:,} params, full fine-tune), teacher {args.teacher_layers} x {args.teacher_dim} "
        f"({speed['teacher_params']:,} params, {speed['teacher_params'] / speed['student_params']:.2f}x), "
        f"{speed['samples']} samples of ~256 tokens = one epoch of {args.steps} steps x batch {args.batch_size}",
        "",
        "| k | pre-pass wall (s) | in-process (s) | s / 1000 tokens (wall) | s / 1000 tokens (in-process) | "
        "token rows | cache (MiB) | bytes / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in speed["prepass"]:
        lines.append(
            f"| {p['k']} | {p['wall_seconds']:.2f} | {p['prepass_seconds']:.2f} | "
            f"{1000 * p['wall_seconds'] / p['num_rows']:.3f} | {1000 * p['prepass_seconds'] / p['num_rows']:.3f} | "
            f"{p['num_rows']} | {p['bytes'] / 2**20:.2f} | {p['bytes_per_token']:.1f} |"
        )
    lines += [
        "",
        f"Epoch = Σ per-step seconds (label tokens / logged tokens/s) over steps {args.warmup + 1}..{args.steps} "
        f"(the first {args.warmup} left out as warm-up, in both runs; {speed['epoch_tokens']} label tokens); cached "
        f"from the k={args.cached_k} cache. Peak RSS: os.wait4 of each fresh process. The teacher's fp32 weights: "
        f"{speed['teacher_weights_mib']:.1f} MiB (never loaded by the cached run).",
        "",
        "| round | live epoch (s) | cached epoch (s) | cached / live | live peak RSS (MiB) | cached peak RSS (MiB) | "
        "cached / live RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    time_ratios, rss_ratios = [], []
    for index, r in enumerate(speed["rounds"], 1):
        live, cached = r["live"], r["cached"]
        time_ratios.append(cached["epoch_seconds"] / live["epoch_seconds"])
        rss_ratios.append(cached["max_rss_mib"] / live["max_rss_mib"])
        lines.append(f"| {index} | {live['epoch_seconds']:.2f} | {cached['epoch_seconds']:.2f} | {time_ratios[-1]:.3f} | "
                     f"{live['max_rss_mib']:.0f} | {cached['max_rss_mib']:.0f} | {rss_ratios[-1]:.3f} |")
    live_s = statistics.median(r["live"]["epoch_seconds"] for r in speed["rounds"])
    cached_s = statistics.median(r["cached"]["epoch_seconds"] for r in speed["rounds"])
    live_rss = statistics.median(r["live"]["max_rss_mib"] for r in speed["rounds"])
    cached_rss = statistics.median(r["cached"]["max_rss_mib"] for r in speed["rounds"])
    lines.append(f"| median | {live_s:.2f} | {cached_s:.2f} | {statistics.median(time_ratios):.3f} | {live_rss:.0f} | "
                 f"{cached_rss:.0f} | {statistics.median(rss_ratios):.3f} |")
    lines.append(f"\ncached / live epoch time: median {statistics.median(time_ratios):.3f} (range "
                 f"{min(time_ratios):.3f}–{max(time_ratios):.3f}; the issue asks for ≤ 0.5); live − cached peak RSS: "
                 f"{live_rss - cached_rss:.0f} MiB vs the teacher's weights {speed['teacher_weights_mib']:.1f} MiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- quality

METRICS = (("heldout_ppl", "held-out perplexity", 3), ("top1_agreement", "top-1 agreement", 4))


def run_experiment(workdir: Path, args: argparse.Namespace, *, cached: bool, checkout: Path) -> Path:
    """``scripts/experiment.py --tiny`` of the checkout ``checkout`` (forward KL, no IR, and the CE-only baseline),
    live or from a k-cache.

    Returns:
        Path: the experiment's output folder (``cells/<cell>/result.json`` per cell).
    """
    quality = workdir / "quality"
    out = quality / ("cached" if cached else "live")
    command = [
        sys.executable, str(checkout / "scripts" / "experiment.py"), "--tiny", "--assets", str(workdir / "tiny_experiment"),
        "--teacher-pretrain-steps", str(args.pretrain_steps), "--divergences", "forward_kl", "--ir", "off",
        "--seeds", args.seeds, "--steps", str(args.quality_steps), "--eval-windows", str(args.eval_windows),
        "--out", str(out),
    ]
    if cached:
        command += ["--teacher-cache", str(quality / "cache"), "--cache-top-k", str(args.quality_k)]
    print("$ " + shlex.join(command), flush=True)
    log = quality / f"{out.name}.log"
    with log.open("w") as sink:
        done = subprocess.run(command, cwd=checkout, stdout=sink, stderr=subprocess.STDOUT,
                              env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"scripts/experiment.py ({out.name}) failed (exit {done.returncode}); see {log}")
    return out


def read_cells(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The experiment's finished cells by (setting, seed)."""
    cells = {}
    for path in sorted((out / "cells").glob("*/result.json")):
        row = json.loads(path.read_text())
        cells[(str(row["setting"]), int(row["seed"]))] = row
    return cells


def measure_quality(folder: output_folder.OwnedFolder, args: argparse.Namespace, *, checkout: Path) -> dict[str, Any]:
    """Run the experiment live and from the cache; per setting and metric: both means ± se and the paired Δ."""
    from torchtune_kd.experiment import mean_se, t_critical

    # quality/: this benchmark's own experiment outputs, fresh each time; tiny_experiment/: the experiment's
    # stand-ins, reused (deterministic).
    folder.claim("quality", "tiny_experiment")
    folder.remove("quality")
    workdir = folder.path.resolve()
    (workdir / "quality").mkdir()
    live, cached = (read_cells(run_experiment(workdir, args, cached=flag, checkout=checkout)) for flag in (False, True))
    if sorted(live) != sorted(cached):
        raise SystemExit(f"live and cached experiments finished different cells: {sorted(live)} vs {sorted(cached)}")
    # Cells without IR must have distilled from the cache (a silent live fallback would make Δ meaningless).
    sources = sorted({row.get("teacher", "live") for row in cached.values()})
    from torchtune_kd.core import teacher_cache

    manifest = teacher_cache.read_manifest(workdir / "quality" / "cache")
    summary: dict[str, Any] = {"teacher_sources_cached": sources, "settings": {},
                               "cache_mean_tail_mass": manifest.get("mean_tail_mass") if manifest else None}
    for setting in sorted({s for s, _ in live}, key=lambda s: (s != "ce_only", s)):
        seeds = sorted(seed for s, seed in live if s == setting)
        entry: dict[str, Any] = {"n": len(seeds), "seeds": seeds}
        for metric, _, _ in METRICS:
            a = [float(live[(setting, s)][metric]) for s in seeds]
            b = [float(cached[(setting, s)][metric]) for s in seeds]
            diff, diff_se = mean_se([y - x for x, y in zip(a, b)])
            entry[metric] = {
                "live": mean_se(a), "cached": mean_se(b), "diff": (diff, diff_se),
                # A paired t-test at 95%: |Δ| > t(n-1) · se (t_critical is inf below 2 seeds: never significant).
                "significant": bool(not math.isnan(diff_se) and abs(diff) > t_critical(len(seeds) - 1) * diff_se),
                "values": {"live": a, "cached": b},
            }
        summary["settings"][setting] = entry
    return summary


def _pm(pair: Sequence[float], digits: int) -> str:
    mean, se = pair
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def quality_report(quality: dict[str, Any], args: argparse.Namespace) -> str:
    """Markdown: per setting and metric, live and cached mean ± se and the paired Δ (cached − live) ± se."""
    lines = [
        f"\n### quality: tiny experiment (teacher pre-trained {args.pretrain_steps} steps), {args.quality_steps} steps "
        f"per run, k={args.quality_k} cache vs the live teacher, seeds {args.seeds}; ± = standard error over seeds, Δ "
        "paired by seed, * = paired t-test significant at 95%",
        "",
        "| setting | n | metric | live | cached | Δ cached − live |",
        "|---|---|---|---|---|---|",
    ]
    for setting, entry in quality["settings"].items():
        for metric, label, digits in METRICS:
            m = entry[metric]
            mark = " *" if m["significant"] else ""
            lines.append(f"| {setting} | {entry['n']} | {label} | {_pm(m['live'], digits)} | {_pm(m['cached'], digits)} | "
                         f"{_pm(m['diff'], digits)}{mark} |")
    lines.append(f"\ncached experiment's teacher source per cell: {', '.join(quality['teacher_sources_cached'])}; "
                 "ce_only has KD weight 0, so its Δ should be ≈ 0 (a sanity check).")
    if quality.get("cache_mean_tail_mass") is not None:
        lines.append(f"The teacher's mean probability mass outside its top {args.quality_k} on the training tokens (the "
                     f"cache manifest's mean_tail_mass): {quality['cache_mean_tail_mass']:.3f}.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]], *, repo: Path) -> argparse.Namespace:
    """The command line (``--smoke`` applied); ``repo`` (the checkout) gives the default ``--workdir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--part", choices=("both", "speed", "quality"), default="both")
    parser.add_argument("--smoke", action="store_true", help="everything tiny and fast, replacing --steps --rounds --ks --cached-k --seeds --quality-steps "
                        "--pretrain-steps --eval-windows (checks the script runs; its numbers mean nothing)")
    parser.add_argument("--workdir", type=Path, default=repo / "cache" / "bench_cache",
                        help="every file goes here: a new, empty, or this script's own folder (default: %(default)s)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--steps", type=int, default=16, help="steps of one epoch (the dataset is steps x batch samples)")
    speed.add_argument("--rounds", type=int, default=3)
    speed.add_argument("--warmup", type=int, default=1, help="first steps left out of both epochs' time")
    speed.add_argument("--ks", default="16,64,256", help="k of each pre-pass")
    speed.add_argument("--cached-k", type=int, default=64, help="the cache the cached epoch reads (one of --ks)")
    speed.add_argument("--batch-size", type=int, default=4)
    speed.add_argument("--student-dim", type=int, default=256)
    speed.add_argument("--teacher-dim", type=int, default=384)
    speed.add_argument("--teacher-layers", type=int, default=5, help="5 x 384 is 4.3x the 2 x 256 student's parameters")
    quality = parser.add_argument_group("quality")
    quality.add_argument("--seeds", default="0,1,2")
    quality.add_argument("--quality-steps", type=int, default=40)
    quality.add_argument("--quality-k", type=int, default=64)
    quality.add_argument("--pretrain-steps", type=int, default=150, help="the tiny teacher's pre-training")
    quality.add_argument("--eval-windows", type=int, default=48)
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.k_list = list(dict.fromkeys(int(k) for k in args.ks.split(",") if k))
    if args.cached_k not in args.k_list:
        parser.error(f"--cached-k {args.cached_k} must be one of --ks {args.ks} (its pre-pass is the cache read)")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must leave at least one of the {args.steps} steps")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Claim ``--workdir``, run the parts asked for, print the report and write ``results.json``; returns 0."""
    repo = checkout_dir()
    args = parse_args(argv, repo=repo)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = f"python scripts/bench_cache.py {shlex.join(shown)}".rstrip()
    # Before anything is built: a folder holding anything but this script's outputs is refused.
    workdir = output_folder.claim_or_exit(args.workdir.resolve(), owner=OWNER, option="--workdir")
    tag = speed_tag(args)
    speed = ["assets", "long_samples.json", f"student_{tag}", f"teacher_{tag}", "live.yaml", "cached.yaml", "runs",
             "caches", "logs"]
    try:  # every entry either part writes, so that a name in the way stops the benchmark now, not midway
        workdir.claim("results.json", *(speed if args.part in ("both", "speed") else []),
                      *(["quality", "tiny_experiment"] if args.part in ("both", "quality") else []))
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    started = time.perf_counter()
    results: dict[str, Any] = {"command": command, "settings": {k: str(v) for k, v in vars(args).items()}}
    reports = []
    if args.part in ("both", "speed"):
        results["speed"] = measure_speed(workdir, args, checkout=repo)
        reports.append(speed_report(results["speed"], args))
    if args.part in ("both", "quality"):
        results["quality"] = measure_quality(workdir, args, checkout=repo)
        reports.append(quality_report(results["quality"], args))
    results["seconds"] = time.perf_counter() - started
    (workdir.path / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n## teacher cache benchmark\n\n`{command}`")
    print("\n".join(reports))
    print(f"\n(total {results['seconds']:.0f} s; results also in {workdir.path / 'results.json'})")
    return 0

