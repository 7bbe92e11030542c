"""Pad a Hugging Face checkpoint's vocabulary: the same model with ``--rows`` padding rows in its token embedding
(and untied output layer), as families pad their larger models (Qwen2.5-7B: 152,064 rows for a 151,665-token
tokenizer). The padded-vocabulary evidence (README, "Teachers with another tokenizer") distils from such a teacher::

    python scripts/pad_vocab.py --checkpoint cache/smollm2/teacher --rows 128 --out cache/smollm2/teacher_padded

``--out`` follows the output-folder rule (``torchtune_kd.output_folder``): a new or empty folder, or one this
command wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

OWNER = "scripts/pad_vocab.py"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the padded checkpoint; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a single-file safetensors checkpoint folder")
    parser.add_argument("--rows", type=int, required=True, help="padding rows to add (>= 1)")
    parser.add_argument("--out", type=Path, required=True, help="the padded checkpoint's folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the padding rows' values")
    parser.add_argument("--std", type=float, default=None, help="their standard deviation (default: the embedding's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder holding other files (they are never replaced)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise SystemExit(f"error: --rows={args.rows} must be >= 1")
    for name in ("model.safetensors", "config.json"):
        if not (args.checkpoint / name).is_file():
            raise SystemExit(f"error: --checkpoint={args.checkpoint} has no {name}: give a Hugging Face folder with a "
                             "single-file model.safetensors")
    from torchtune_kd import output_folder
    from torchtune_kd.models.padding import pad_vocabulary

    try:
        out = pad_vocabulary(args.checkpoint, args.out, args.rows, seed=args.seed, std=args.std, owner=OWNER,
                             option="--out", overwrite=args.overwrite)
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
    config = json.loads((out / "config.json").read_text())
    print(f"Padded checkpoint written to {out}: vocab_size {config['vocab_size']} (+{args.rows} rows). Distil from it "
          f"with teacher_model.vocab_size={config['vocab_size']} teacher_checkpointer.checkpoint_dir={out} and "
          "teacher_tokenizer set to the teacher's tokenizer.")
    return 0
