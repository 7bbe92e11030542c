#!/usr/bin/env python
"""Build the deterministic local stand-ins (tokenizer, tiny teacher/student, alpaca data) into a folder.

Usage: python scripts/build_standins.py OUT_DIR [--teacher-pretrain-steps N] [--force]
"""

import argparse
import json
from pathlib import Path

import kd_standins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--teacher-pretrain-steps", type=int, default=0, help="CE steps to pre-train the tiny teacher")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    manifest = kd_standins.build_standins(args.out_dir, teacher_pretrain_steps=args.teacher_pretrain_steps, force=args.force)
    print(json.dumps({k: manifest[k] for k in ("root", "vocab_size", "teacher_pretrain_final_loss")}, indent=2))


if __name__ == "__main__":
    main()
