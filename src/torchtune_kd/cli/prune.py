"""Prune a teacher by depth: score its layers on calibration text, keep the most influential, write the student.

Reads the teacher from a distillation config (``teacher_model``, ``teacher_checkpointer``, ``tokenizer``), scores
every layer by block influence (1 − mean cosine between the layer's input and output hidden states over the
calibration tokens; ShortGPT / Minitron depth pruning) or keeps layers evenly spaced, prints the scores and the
choice, and writes the student as a Hugging Face folder plus the ``layer_mapping`` that aligns each kept layer with
its own teacher layer (also in ``OUT/pruning.json``)::

    python scripts/prune.py --config configs/demo_smollm2.yaml --calibration cache/smollm2/text/calibration.txt \\
        --num-layers 22 --out cache/smollm2/student_22L_bi
    python scripts/prune.py ... --method even      # evenly spaced, no scores needed (still printed)

then distil into it with ``model.num_layers=22 checkpointer.checkpoint_dir=OUT layer_mapping=<printed>``.

``--out`` follows the project's output-folder rule (``torchtune_kd.output_folder``): a new or empty folder, or one
this command wrote (its marker lists the files). Rerun with the same teacher, calibration and settings, it reuses
the student there; with other settings it refuses unless ``--overwrite``, which replaces the student this command
wrote and lets it write into a folder holding other files, never over one of them (a user's ``model.safetensors``
there is still refused). Every problem with the arguments, the config's teacher or the calibration text is reported
before the teacher is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from omegaconf import OmegaConf

OWNER = "scripts/prune.py"


def fail(message: str) -> NoReturn:
    """End the command with one line naming the option or file, the value and the fix (no traceback)."""
    raise SystemExit(f"error: {message}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line, every count checked (exit with ``error: ...``)."""
    # allow_abbrev=False: a mistyped or shortened option is an error, never silently another option.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, required=True, help="a distillation config (its teacher is pruned)")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="text the layers are scored on: a plain-text file, or an alpaca-style .json list (its "
                             "instruction, input and output fields are joined), e.g. the training data")
    parser.add_argument("--num-layers", type=int, required=True, help="the student's depth")
    parser.add_argument("--method", choices=("block_influence", "even"), default="block_influence")
    parser.add_argument("--out", type=Path, required=True,
                        help="the student's folder: new, empty, or one this command wrote")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (with bos)")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="replace the student this command wrote in --out (even an identical one), and write into "
                             "a folder holding other files (they are never replaced: a clash is still refused)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    if args.num_layers < 1:
        fail(f"--num-layers={args.num_layers} must be at least 1 (and at most the teacher's depth)")
    if args.seq_len < 2:
        fail(f"--seq-len={args.seq_len} must be at least 2 (bos and one text token per window)")
    if args.windows < 1:
        fail(f"--windows={args.windows} must be at least 1")
    return args


def _config_value(cfg: Any, key: str) -> Any:
    """``cfg``'s dotted ``key``, resolved; a missing or unresolvable key ends the command naming it."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # noqa: BLE001 - any resolution error (an unset env variable...) is the user's to fix
        fail(f"--config: {key} cannot be resolved ({type(err).__name__}: {err})")
    if value is None:
        fail(f"--config: {key} is missing: the teacher to prune is read from teacher_checkpointer, teacher_model and "
             "tokenizer (give a distillation config, or set it as an override key=value)")
    return value


def load_config(args: argparse.Namespace) -> Any:
    """``--config`` merged with the command line's ``key=value`` overrides."""
    if not args.config.is_file():
        fail(f"--config={str(args.config)!r} does not exist: give a distillation config (e.g. configs/tiny_cpu.yaml)")
    try:
        return OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(list(args.overrides)))
    except Exception as err:  # noqa: BLE001 - a YAML or override syntax error is reported, not a traceback
        fail(f"--config={str(args.config)!r} with overrides {list(args.overrides)} cannot be read "
             f"({type(err).__name__}: {err})")


def teacher_files(cfg: Any) -> tuple[Path, list[str], int]:
    """The teacher's folder, weight files and depth, checked before anything loads."""
    key = "teacher_checkpointer.checkpoint_dir"
    teacher_dir = Path(str(_config_value(cfg, key)))
    if not teacher_dir.is_dir():
        fail(f"{key}={str(teacher_dir)!r} (from --config) does not exist: point it at the teacher's Hugging Face "
             f"folder, e.g. with the override {key}=DIR")
    names = _config_value(cfg, "teacher_checkpointer.checkpoint_files")
    if OmegaConf.is_list(names):
        files = [str(name) for name in names]
    else:
        fail(f"teacher_checkpointer.checkpoint_files={names} must be a list of the teacher's weight files")
    config_path = teacher_dir / "config.json"
    if not config_path.is_file():
        fail(f"{key}={str(teacher_dir)!r} has no config.json: point it at a Hugging Face model folder")
    try:
        depth = json.loads(config_path.read_text())["num_hidden_layers"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        fail(f"{str(config_path)!r} gives no num_hidden_layers ({type(err).__name__}): it is not a Hugging Face "
             "model config")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        fail(f"{str(config_path)!r} has num_hidden_layers={depth!r}: it is not a Hugging Face model config")
    missing = [name for name in files if not (teacher_dir / name).is_file()]
    if missing:
        fail(f"teacher_checkpointer.checkpoint_files: {', '.join(missing)} not found in {str(teacher_dir)!r}: list "
             "the teacher's safetensors files")
    return teacher_dir, files, depth


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check everything, then score, choose and write the student; returns 0 (a refusal exits with its message)."""
    args = parse_args(argv)
    cfg = load_config(args)
    from torchtune_kd import output_folder, pruning

    teacher_dir, files, depth = teacher_files(cfg)
    if not args.num_layers <= depth:
        fail(f"--num-layers={args.num_layers} must be from 1 to the teacher's depth {depth}")
    problems = pruning.student_folder_problems(args.out, teacher_dir, owner=OWNER, option="--out",
                                               overwrite=args.overwrite, overwrite_hint="--overwrite")
    if problems:
        fail(problems[0])
    try:
        text = pruning.calibration_text(args.calibration)
    except ValueError as err:
        fail(str(err))
    teacher_model = _config_value(cfg, "teacher_model")
    try:
        plain = {k: v for k, v in OmegaConf.to_container(teacher_model, resolve=True).items()
                 if k != "output_hidden_states"}
    except Exception as err:  # noqa: BLE001 - an unresolvable value is the config's to fix
        fail(f"--config: teacher_model cannot be resolved ({type(err).__name__}: {err})")
    tokenizer_cfg = _config_value(cfg, "tokenizer")

    import torch
    from torchtune import config as tt_config, training

    from torchtune_kd.core import models

    try:
        tokenizer = tt_config.instantiate(tokenizer_cfg)
    except Exception as err:  # noqa: BLE001 - any failure to build it is the config's to fix
        fail(f"--config: tokenizer cannot be built ({type(err).__name__}: {err})")
    try:
        windows = pruning.calibration_windows(tokenizer, text, args.seq_len, args.windows, source=args.calibration)
    except ValueError as err:
        fail(str(err))
    settings = {
        "teacher_dir": str(teacher_dir.resolve()),
        "teacher_files": pruning.teacher_fingerprint(teacher_dir, files),
        "method": args.method,
        "num_layers": args.num_layers,
        "calibration_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "seq_len": args.seq_len,
        "windows": args.windows,
    }
    found, earlier = pruning.recorded_settings(args.out, OWNER)
    if found and earlier != settings and not args.overwrite:
        fail(f"--out={str(args.out)!r} holds a student {OWNER} wrote with other settings "
             f"({pruning.settings_change(earlier, settings)}): pass --overwrite to replace it, or give another folder")
    try:
        folder = pruning.claim_student_folder(args.out, teacher_dir, owner=OWNER, option="--out",
                                              overwrite=args.overwrite, overwrite_hint="--overwrite")
    except output_folder.OutputFolderError as err:
        fail(str(err))

    print(f"teacher: {teacher_dir} ({depth} layers); scoring on {args.calibration} ...", flush=True)
    ckpt_cfg = cfg.teacher_checkpointer
    state = tt_config.instantiate(ckpt_cfg, should_load_recipe_state=False).load_checkpoint()[training.MODEL_KEY]
    teacher = models.build_teacher(OmegaConf.create(plain), device=torch.device("cpu"), dtype=torch.float32,
                                   state_dict=state)
    del state
    scores = pruning.block_influence(teacher, windows).tolist()
    del teacher
    if args.method == "block_influence":
        kept = pruning.most_influential(scores, args.num_layers)
    else:
        kept = pruning.evenly_spaced(depth, args.num_layers)

    print(f"\nblock influence (1 - mean cos(input, output)) over {windows.numel()} tokens in {len(windows)} windows:")
    print("| layer | block influence | kept |")
    print("|---|---|---|")
    for layer, score in enumerate(scores):
        print(f"| {layer} | {score:.5f} | {'yes' if layer in kept else ''} |")
    info = {
        "method": args.method,
        "block_influence": scores,
        "calibration": {"file": str(args.calibration), "sha256": settings["calibration_sha256"],
                        "tokens": int(windows.numel()), "windows": len(windows), "seq_len": args.seq_len},
        "settings": settings,
    }
    record = pruning.write_pruned_student(teacher_dir, folder, kept, files=files, info=info, force=args.overwrite)
    mapping = json.dumps(record["layer_mapping"]).replace(" ", "")
    print(f"\nkept teacher layers ({args.method}): {kept}")
    print(f"student written to {record['out_dir']} ({len(kept)} layers; {Path(record['out_dir']) / pruning.MARKER})")
    print(f"distil into it with: model.num_layers={len(kept)} checkpointer.checkpoint_dir={record['out_dir']} "
          f"layer_mapping={mapping}")
    return 0

