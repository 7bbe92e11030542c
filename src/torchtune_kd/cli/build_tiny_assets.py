"""Build the deterministic local stand-in assets (tokenizer, tiny teacher / student, alpaca data) into a folder.

Usage:
    python scripts/build_tiny_assets.py OUT_DIR [--teacher-pretrain-steps N] [--force]

Nothing is rebuilt when OUT_DIR already holds a build with the same parameters (unless --force). Prints a short
JSON summary of the manifest (OUT_DIR/manifest.json holds all of it).

OUT_DIR must be new, empty, or a stand-ins folder built before (its marker file ``.torchtune_kd_outputs.json`` lists
the stand-ins' entries); anything else is refused before anything is built, and a file the build did not write is
never replaced or deleted (--force rebuilds only the stand-ins' own entries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("out_dir", type=Path, help="destination folder: new, empty, or stand-ins built before")
    parser.add_argument(
        "--teacher-pretrain-steps",
        type=_non_negative_int,
        default=0,
        help="next-token CE steps that give the tiny teacher real signal (0: random teacher; ~200 for demos)",
    )
    parser.add_argument("--force", action="store_true",
                        help="rebuild the stand-ins' own entries even when the folder is up to date")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the assets and print a summary; returns the process exit status."""
    args = parse_args(argv)
    from torchtune_kd.output_folder import OutputFolderError
    from torchtune_kd.testing import standins

    try:
        manifest = standins.build_all(
            args.out_dir, teacher_pretrain_steps=args.teacher_pretrain_steps, force=args.force, option="OUT_DIR"
        )
    except OutputFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary_keys = ("root", "vocab_size", "num_train", "num_eval", "teacher_pretrain_steps",
                    "teacher_pretrain_final_loss", "weights_sha256")
    print(json.dumps({key: manifest[key] for key in summary_keys}, indent=2))
    return 0

