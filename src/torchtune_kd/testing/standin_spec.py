"""The fixed build parameters of the stand-in assets, and the checks and JSON writer every builder shares.

A change to any value here changes the assets (``standins.build_all`` records them in the manifest's ``params`` and
rebuilds when they differ).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

FORMAT_VERSION = 1
BPE_VOCAB_SIZE = 1024
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Model shapes: head_dim 32 (teacher) and 16 (student), SwiGLU width ~2.75x like Llama 3.2, GQA 2 queries per kv.
TEACHER_SHAPE = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 352}
STUDENT_SHAPE = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "intermediate_dim": 176}
MODEL_COMMON = {"max_seq_len": 512, "rope_base": 500000, "norm_eps": 1e-5}
SEEDS = {"teacher": 1, "student": 2, "data": 1234, "pretrain": 3}
DATA_SIZES = {"num_train": 256, "num_eval": 64, "num_heldout": 64, "max_tokens": 200}


def check_int(name: str, value: Any, low: int, high: Optional[int] = None, fix: str = "") -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; otherwise a ``ValueError`` naming ``name``, the
    bound and ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be an int {bound}{'; ' + fix if fix else ''}")
    return value


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` as indented UTF-8 JSON ending in a newline."""
    # Fixed key order and formatting: assets must be byte-identical across builds.
    Path(path).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
