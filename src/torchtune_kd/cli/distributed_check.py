"""Check the distributed recipe against the single-device one, and try a real config on dummy weights.

Two commands (``scripts/gpu_check.sh`` runs both on CUDA GPUs in bf16; on CPU they run with gloo in fp32):

``equivalence``: on the tiny stand-ins, the same distillation (JSD + cosine IR on two layer pairs, dynamic loss
scaling, gradient accumulation 2) once on one device with ``batch_size = 2 * nproc`` and once on ``nproc``
processes with ``batch_size = 2`` each (the same global batches), for a full fine-tune and a LoRA student. Prints
the largest relative difference of each logged loss over the steps and of the final weights, and exits non-zero
when one exceeds the tolerance (fp32: 1e-5 relative for the losses, 1e-5 absolute for the weights; bf16: 2e-2
and 2e-2: bf16 keeps ~3 significant digits and the two runs sum in different orders)::

    python scripts/distributed_check.py equivalence --device cpu --dtype fp32 --nproc 2

``dummy``: a shipped config's real architectures with random weights (written once as Hugging Face folders), the
stand-in tokenizer and data, a few steps on ``nproc`` processes; prints tokens/s and every rank's peak memory::

    python scripts/distributed_check.py dummy --config configs/distributed_3B_to_1B.yaml --nproc 2 --steps 5

Every file goes under ``--workdir`` (default ``cache/distributed_check``), which must be new, empty, or a folder this
script wrote (its marker file ``.torchtune_kd_outputs.json`` lists what it wrote; a rerun replaces its runs and reuses
the stand-ins); anything else is refused before anything is built, and a file this script did not write is never
replaced or deleted.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from torchtune_kd import output_folder
from torchtune_kd.cli import checkout_dir

OWNER = "scripts/distributed_check.py"
SINGLE = "recipes/knowledge_distillation_single_device.py"
DISTRIBUTED = "recipes/knowledge_distillation_distributed.py"
LOSSES = ("loss", "ce_loss", "kd_loss", "ir_loss")
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (2e-2, 2e-2)}


def _run(
    recipe: str, config: Path, overrides: list[str], *, nproc: Optional[int], env: dict, log: Path, checkout: Path
) -> None:
    """``tune run`` one recipe in the checkout ``checkout`` (output to ``log``); exit with the log's end if it fails."""
    from torchtune_kd import tune_cli

    with log.open("w") as out:
        result = tune_cli.tune_run(recipe, config, overrides, cwd=checkout, env=env, stdout=out, nproc_per_node=nproc)
    if result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{recipe} failed (exit {result.returncode}); the end of {log}:\n{tail}")


def _assets(workdir: output_folder.OwnedFolder) -> Path:
    from torchtune_kd.testing import standins

    root = workdir.path_of("assets").resolve()
    standins.build_all(root)
    return root


def _fresh(parent: output_folder.OwnedFolder, name: str) -> output_folder.OwnedFolder:
    """``parent/name`` as an empty folder of this script's own (an earlier check's removed), claimed with a marker so
    that the runs in it can be replaced one by one."""
    parent.claim(name)
    parent.remove(name)
    return output_folder.claim_output_folder(parent.path / name, owner=OWNER, option="--workdir")


def _max_relative(a: dict, b: dict) -> float:
    worst = 0.0
    for step, value in a.items():
        other = b[step]
        worst = max(worst, abs(other - value) / max(abs(value), 1e-12))
    return worst


def equivalence(args: argparse.Namespace, repo: Path) -> int:
    """The ``equivalence`` command in the checkout ``repo``; returns 1 when a difference exceeds the tolerance."""
    from safetensors.torch import load_file

    from torchtune_kd.evaluation import run_logs
    from torchtune_kd.testing.recipes import LORA_OVERRIDES

    workdir = _claim_workdir(args, [*args.kinds, *(f"{kind}_{name}.log" for kind in args.kinds for name in ("single", "dist"))])
    assets = _assets(workdir)
    env = {"KD_ASSETS": str(assets)}
    loss_tol, weight_tol = TOLERANCE[args.dtype]
    common = [
        f"device={args.device}", f"dtype={args.dtype}", "epochs=1", f"max_steps_per_epoch={args.steps}",
        "gradient_accumulation_steps=2", "loss_scaling.method=dynamic", "seed=3", "overwrite_output_dir=true",
        "log_peak_memory_stats=false",
    ]
    failed = False
    print(f"{'student':8} {'metric':12} {'max rel. diff':>14}  ({args.nproc} processes vs 1, {args.steps} steps, "
          f"{args.device} {args.dtype})")
    for kind in args.kinds:
        extra = list(LORA_OVERRIDES) if kind == "lora" else []
        runs = {}
        kind_dir = _fresh(workdir, kind)  # an earlier check's logs would be read with the new ones
        for name, recipe, nproc, batch in (("single", SINGLE, None, 2 * args.nproc), ("dist", DISTRIBUTED, args.nproc, 2)):
            out = kind_dir.path_of(name).resolve()
            _run(recipe, repo / "configs" / "tiny_cpu.yaml",
                 [*extra, *common, f"batch_size={batch}", f"output_dir={out}"], nproc=nproc, env=env,
                 log=workdir.path_of(f"{kind}_{name}.log"), checkout=repo)
            runs[name] = (out, run_logs.read_disk_log(out / "logs"))
        for metric in LOSSES:
            diff = _max_relative(dict(runs["single"][1][metric]), dict(runs["dist"][1][metric]))
            failed |= diff > loss_tol
            print(f"{kind:8} {metric:12} {diff:14.2e}")
        wa = load_file(runs["single"][0] / "epoch_0" / "model-00001-of-00001.safetensors")
        wb = load_file(runs["dist"][0] / "epoch_0" / "model-00001-of-00001.safetensors")
        diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
        failed |= diff > weight_tol
        print(f"{kind:8} {'weights':12} {diff:14.2e}  (max absolute)")
    print("FAILED: a difference exceeds the tolerance" if failed else f"OK (tolerance {loss_tol:g} / {weight_tol:g})")
    return 1 if failed else 0


def dummy(args: argparse.Namespace, repo: Path) -> int:
    """The ``dummy`` command in the checkout ``repo``: a few steps of a config's architectures on random weights."""
    from omegaconf import OmegaConf

    from torchtune_kd.evaluation import run_logs
    from torchtune_kd.testing import standins

    name = Path(args.config).stem
    workdir = _claim_workdir(args, ["dummy", "runs", f"{name}.log"])
    assets = _assets(workdir)
    cfg = OmegaConf.load(args.config)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # dummy/<config>/ holds the random weights (rewritten each time), runs/<config>/ the run (replaced).
    folders = {key: workdir.path.resolve() / "dummy" / name / key for key in ("model", "teacher_model")}
    for offset, (key, folder) in enumerate(folders.items()):
        print(f"writing dummy weights for {key} ({cfg[key]._component_}) to {folder} ...", flush=True)
        standins.write_random_checkpoint(cfg[key], folder, dtype=dtype, seed=offset)
    workdir.claim("runs")
    runs = output_folder.claim_output_folder(workdir.path / "runs", owner=OWNER, option="--workdir")
    runs.claim(name)
    runs.remove(name)  # an earlier check's logs would be read with the new ones
    out = runs.path.resolve() / name
    overrides = [
        f"checkpointer.checkpoint_dir={folders['model']}", "checkpointer.checkpoint_files=[model.safetensors]",
        f"teacher_checkpointer.checkpoint_dir={folders['teacher_model']}",
        "teacher_checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={assets / 'tokenizer' / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={assets / 'tokenizer' / 'tokenizer.json'}",
        "dataset._component_=torchtune.datasets.alpaca_dataset", "dataset.source=json",
        f"dataset.data_files={assets / 'data' / 'alpaca_train.json'}", "dataset.split=train",
        f"output_dir={out}", f"metric_logger.log_dir={out / 'logs'}",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", "epochs=1",
        f"max_steps_per_epoch={args.steps}", f"device={args.device}", f"dtype={args.dtype}", "log_peak_memory_stats=true",
        "overwrite_output_dir=true", *args.overrides,
    ]
    _run(DISTRIBUTED, Path(args.config), overrides, nproc=args.nproc, env={}, log=workdir.path_of(f"{name}.log"),
         checkout=repo)
    metrics = run_logs.read_disk_log(out / "logs")
    later = lambda key: [v for step, v in metrics[key] if step > 1] or [v for _, v in metrics[key]]  # noqa: E731
    print(f"{name} on {args.nproc} processes ({args.device}, {args.dtype}), {args.steps} steps on dummy weights:")
    print(f"  tokens/s (median after step 1): {statistics.median(later('tokens_per_second')):.1f} in all, "
          f"{statistics.median(later('tokens_per_second_per_gpu')):.1f} per process")
    memory = sorted(k for k in metrics if k.startswith("peak_memory") and "/rank" in k)
    for key in memory:
        print(f"  {key}: {max(v for _, v in metrics[key]):.2f} GiB (peak over steps)")
    print(f"  losses: {[round(v, 4) for _, v in metrics['loss']]}")
    return 0


def _claim_workdir(args: argparse.Namespace, entries: Sequence[str]) -> output_folder.OwnedFolder:
    """Claim ``--workdir`` and the entries this command writes there, before anything is built; exit on a refusal."""
    workdir = output_folder.claim_or_exit(Path(args.workdir), owner=OWNER, option="--workdir")
    try:
        workdir.claim("assets", *entries)
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    return workdir


def parse_args(argv: Optional[Sequence[str]] = None, *, repo: Path) -> argparse.Namespace:
    """The command line; ``repo`` (the checkout) gives the default ``--workdir``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("equivalence", "dummy"):
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
        p.add_argument("--nproc", type=int, default=2)
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--workdir", default=str(repo / "cache" / "distributed_check"),
                       help="every file goes here: a new, empty, or this script's own folder (default: %(default)s)")
    sub.choices["equivalence"].add_argument("--kinds", nargs="+", default=["full", "lora"], choices=("full", "lora"))
    sub.choices["dummy"].add_argument("--config", required=True)
    sub.choices["dummy"].add_argument("overrides", nargs="*", help="extra key=value overrides for the run")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named on the command line; its exit status."""
    repo = checkout_dir()
    args = parse_args(argv, repo=repo)
    os.environ.setdefault("WANDB_MODE", "offline")
    return equivalence(args, repo) if args.command == "equivalence" else dummy(args, repo)

