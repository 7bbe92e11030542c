#!/usr/bin/env python
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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a distillation config (its teacher is pruned)")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="text the layers are scored on: a plain-text file, or an alpaca-style .json list (its "
                             "instruction, input and output fields are joined), e.g. the training data")
    parser.add_argument("--num-layers", type=int, required=True, help="the student's depth")
    parser.add_argument("--method", choices=("block_influence", "even"), default="block_influence")
    parser.add_argument("--out", type=Path, required=True, help="the student's folder")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (with bos)")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--force", action="store_true", help="rewrite the student folder even if it holds this choice")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser.parse_args(argv)


def calibration_windows(tokenizer, text: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows ``(n, seq_len)`` of the text, each starting with bos, as in training."""
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    body = seq_len - 1
    windows = [[tokenizer.bos_id, *ids[start: start + body]] for start in range(0, len(ids) - body + 1, body)]
    if not windows:
        raise SystemExit(f"error: --calibration has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(windows[:max_windows])


def calibration_text(path: Path) -> str:
    """A plain-text file as it is; an alpaca-style JSON list as its records' instruction / input / output text."""
    if path.suffix != ".json":
        return path.read_text()
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"error: --calibration={str(path)!r} is JSON but not a list of records")
    fields = ("instruction", "input", "output")
    return "\n\n".join(" ".join(str(r.get(f) or "") for f in fields).strip() for r in records)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from torchtune import config as tt_config, training

    from torchtune_kd import pruning
    from torchtune_kd.core import models

    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(list(args.overrides)))
    if not args.calibration.is_file():
        raise SystemExit(f"error: --calibration={str(args.calibration)!r} does not exist")
    ckpt_cfg = cfg.teacher_checkpointer
    teacher_dir = Path(str(ckpt_cfg.checkpoint_dir))
    files = [str(name) for name in ckpt_cfg.checkpoint_files]
    depth = int(json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"])
    if not 1 <= args.num_layers <= depth:
        raise SystemExit(f"error: --num-layers={args.num_layers} must be from 1 to the teacher's depth {depth}")

    print(f"teacher: {teacher_dir} ({depth} layers); scoring on {args.calibration} ...", flush=True)
    state = tt_config.instantiate(ckpt_cfg, should_load_recipe_state=False).load_checkpoint()[training.MODEL_KEY]
    plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.teacher_model).items() if k != "output_hidden_states"})
    teacher = models.build_teacher(plain, device=torch.device("cpu"), dtype=torch.float32, state_dict=state)
    del state
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    text = calibration_text(args.calibration)
    windows = calibration_windows(tokenizer, text, args.seq_len, args.windows)
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
        "calibration": {"file": str(args.calibration), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                        "tokens": int(windows.numel()), "windows": len(windows), "seq_len": args.seq_len},
    }
    record = pruning.write_pruned_student(teacher_dir, args.out, kept, files=files, info=info, force=args.force)
    mapping = json.dumps(record["layer_mapping"]).replace(" ", "")
    print(f"\nkept teacher layers ({args.method}): {kept}")
    print(f"student written to {record['out_dir']} ({len(kept)} layers; {Path(record['out_dir']) / pruning.MARKER})")
    print(f"distil into it with: model.num_layers={len(kept)} checkpointer.checkpoint_dir={record['out_dir']} "
          f"layer_mapping={mapping}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
