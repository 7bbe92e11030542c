"""Build a student with the project's own tokenizer: a byte-level BPE trained on Python's pydoc text, and a small
Llama-architecture model using it, optionally CE pre-trained on alpaca-format training data.

The student of the cross-tokenizer evidence (README, "Teachers with another tokenizer"): its tokenizer is not the
teacher's (SmolLM2's), so distilling into it needs ``cross_tokenizer``::

    python scripts/build_bpe_student.py --out cache/smollm2/student_bpe --train-json cache/smollm2/text/train.json

writes ``OUT/tokenizer`` (``tokenizer.model`` for torchtune's ``llama3_tokenizer``, ``tokenizer.json`` for
transformers) and ``OUT/model`` (Hugging Face folder: weights, ``config.json``, the tokenizer files), and prints the
``model`` section of a config. ``--out`` follows the output-folder rule (``torchtune_kd.output_folder``): a new or
empty folder, or one this command wrote (rebuilt with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn, Optional, Sequence

OWNER = "scripts/build_bpe_student.py"
ENTRIES = ("tokenizer", "model", "build.json")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"error: {message}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="the student's folder: new, empty, or this command's")
    parser.add_argument("--train-json", type=Path, required=True, help="alpaca-format JSON list for the pre-training")
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="BPE tokens, the 256 bytes included")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="CE steps on --train-json (0: random init)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild what this command wrote in --out")
    args = parser.parse_args(argv)
    for name in ("bpe_vocab", "layers", "dim", "heads", "kv_heads", "intermediate"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.bpe_vocab <= 256:
        fail(f"--bpe-vocab={args.bpe_vocab} must exceed the 256 byte tokens")
    if args.pretrain_steps < 0 or args.seed < 0:
        fail("--pretrain-steps and --seed must be >= 0")
    if args.pretrain_steps and not args.train_json.is_file():
        fail(f"--train-json={args.train_json} is not a file: give the alpaca JSON list (e.g. cache/smollm2/text/train.json)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the tokenizer and the model; returns the process exit status."""
    args = parse_args(argv)
    from torchtune_kd import output_folder

    folder = output_folder.claim_or_exit(args.out, owner=OWNER, option="--out", overwrite=args.overwrite,
                                         overwrite_hint="--overwrite")
    for name in ENTRIES:
        if folder.owns(name) and not args.overwrite:
            fail(f"--out={args.out} already holds a student this command built: rebuild it with --overwrite, or "
                 "give another folder")
    folder.remove_all()
    folder.claim(*ENTRIES)
    from torchtune_kd.testing import standin_models, standin_text

    tokenizer = standin_text.build_tokenizer(folder.path_of("tokenizer"), bpe_vocab_size=args.bpe_vocab)
    kwargs, losses = standin_models.build_model_folder(
        folder.path_of("model"), tokenizer_dir=folder.path_of("tokenizer"), num_layers=args.layers,
        embed_dim=args.dim, num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_dim=args.intermediate,
        seed=args.seed, max_seq_len=512, rope_base=500000, norm_eps=1e-5, init_std=0.02,
        pretrain_steps=args.pretrain_steps, pretrain_data=args.train_json if args.pretrain_steps else None,
    )
    record = {"builder": kwargs, "bpe_vocab_size": tokenizer["bpe_vocab_size"], "vocab_size": tokenizer["vocab_size"],
              "pretrain_steps": args.pretrain_steps, "pretrain_first_loss": losses[0] if losses else None,
              "pretrain_final_loss": losses[-1] if losses else None, "seed": args.seed}
    folder.path_of("build.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print("model: {_component_: torchtune.models.llama3.llama3, "
          + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}")
    return 0
