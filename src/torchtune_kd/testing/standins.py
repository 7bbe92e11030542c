"""Deterministic local stand-in assets: a Llama 3 style tokenizer, a tiny teacher and student, alpaca data.

Tests and the CPU demo never touch the Hugging Face hub. Everything here is derived from fixed seeds and from
English prose that ships with every CPython (``pydoc_data/topics.py``), and :func:`build_all` writes it in a few
seconds::

    OUT/tokenizer/tokenizer.model        tiktoken file (``base64(token_bytes) rank`` per line) for torchtune
    OUT/tokenizer/tokenizer.json         the same BPE for transformers; Llama 3 special tokens after the BPE ids
    OUT/tokenizer/tokenizer_config.json  bos / eos / pad like Llama 3.2, for transformers and lm-eval
    OUT/teacher/                         Hugging Face Llama folder: model.safetensors, config.json,
                                         generation_config.json and the three tokenizer files
    OUT/student/                         the same, shallower and narrower
    OUT/data/alpaca_train.json           alpaca records (instruction / input / output)
    OUT/data/alpaca_eval.json            held-out alpaca records (other passages)
    OUT/data/heldout.txt                 held-out plain text, blank-line separated (perplexity)
    OUT/manifest.json                    everything below
    OUT/.torchtune_kd_outputs.json       the output-folder marker: the entries above are build_all's own

Manifest keys (stable; other tests depend on them). Paths are **absolute ``str``** (JSON has no ``Path``); wrap
them in ``pathlib.Path`` where needed:

- ``format_version`` (int), ``params`` (dict): the build parameters; a rebuild happens only when they change.
- ``root``, ``tokenizer_dir``, ``teacher_dir``, ``student_dir`` (str): absolute folders.
- ``data`` (dict of str): ``train``, ``eval`` (alpaca JSON lists), ``heldout_text`` (plain text).
- ``num_train``, ``num_eval``, ``num_heldout`` (int): record / passage counts.
- ``vocab_size`` (int, model vocabulary = ``bpe_vocab_size`` + ``num_special_tokens``), ``bpe_vocab_size``,
  ``num_special_tokens``, ``bos_id``, ``eos_id``, ``pad_id`` (int).
- ``teacher_kwargs``, ``student_kwargs`` (dict): keyword arguments for ``torchtune.models.llama3.llama3``.
- ``seeds`` (dict of int): ``teacher``, ``student``, ``data``, ``pretrain``.
- ``teacher_pretrain_steps`` (int), ``teacher_pretrain_losses`` (list of float),
  ``teacher_pretrain_final_loss`` (float or None).
- ``weights_sha256`` (dict of str): ``teacher``, ``student``: SHA-256 of each ``model.safetensors``.
- ``source_text_sha256`` (str), ``python_version`` (str): the pydoc text differs between CPython releases, so
  assets are reproducible byte for byte for a given CPython (and, with pre-training, a given thread count).

The work is split by subject: :mod:`~torchtune_kd.testing.standin_spec` (sizes, seeds, token names),
:mod:`~torchtune_kd.testing.standin_text` (pydoc text, tokenizer, alpaca data) and
:mod:`~torchtune_kd.testing.standin_models` (models and checkpoints); this module builds the whole folder and
re-exports their public names, so ``standins.X`` is the one import path.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

from torchtune_kd import output_folder
from torchtune_kd.testing.standin_models import (
    build_llama_model,
    build_model_folder,
    hf_llama_config,
    init_small_,
    pretrain_causal_lm,
    write_random_checkpoint,
)
from torchtune_kd.testing.standin_spec import (
    BPE_VOCAB_SIZE,
    DATA_SIZES,
    FORMAT_VERSION,
    MODEL_COMMON,
    SEEDS,
    STUDENT_SHAPE,
    TEACHER_SHAPE,
    TOKENIZER_FILES,
    check_int,
    write_json,
)
from torchtune_kd.testing.standin_text import (
    build_alpaca_data,
    build_tokenizer,
    llama3_special_token_names,
    pydoc_paragraphs,
    pydoc_text,
    pydoc_topics,
    read_tokenizer_info,
)

__all__ = [
    "BPE_VOCAB_SIZE",
    "DATA_SIZES",
    "FORMAT_VERSION",
    "MODEL_COMMON",
    "OWNER",
    "SEEDS",
    "STUDENT_SHAPE",
    "TEACHER_SHAPE",
    "TOKENIZER_FILES",
    "build_all",
    "build_alpaca_data",
    "build_llama_model",
    "build_tokenizer",
    "hf_llama_config",
    "init_small_",
    "llama3_special_token_names",
    "load_manifest",
    "pretrain_causal_lm",
    "pydoc_paragraphs",
    "pydoc_text",
    "pydoc_topics",
    "read_tokenizer_info",
    "write_random_checkpoint",
]

# The owner (output_folder's marker) of a folder build_all claims, whichever command asked for it: one stand-ins
# folder serves every script (scripts/build_tiny_assets.py OUT, then scripts/experiment.py --assets OUT).
OWNER = "torchtune_kd.testing.standins"
# The top-level entries build_all writes.
_ENTRIES = ("manifest.json", "tokenizer", "data", "teacher", "student")


def build_all(
    out_dir: Path,
    *,
    teacher_pretrain_steps: int = 0,
    force: bool = False,
    folder: Optional[output_folder.OwnedFolder] = None,
    option: str = "out_dir",
) -> dict[str, Any]:
    """Build (or reuse) the tokenizer, teacher, student and data into ``out_dir`` and return the manifest.

    Idempotent: when ``out_dir`` holds a build of this function (its marker lists it) with the same build parameters
    and its files are present, it is reused and nothing is written. Otherwise ``out_dir`` is claimed through
    :mod:`torchtune_kd.output_folder` before anything is built (owner :data:`OWNER`; a folder holding anything else is
    refused), the entries of an earlier build there are removed and the manifest is written last, so an interrupted
    build never looks complete. A file of another name in the folder is never touched.

    Args:
        out_dir (Path): destination folder (created).
        teacher_pretrain_steps (int): CE steps pre-training the teacher on the training records (0: random teacher,
            fast, for tests; ~200 gives a demo teacher with real signal).
        force (bool): rebuild even when up to date.
        folder (Optional[OwnedFolder]): the caller's own claimed folder to build into (its path must be ``out_dir``):
            for a command that keeps the stand-ins beside its other outputs. The entries ``tokenizer``, ``data``,
            ``teacher``, ``student`` and ``manifest.json`` are claimed in it. Default: ``out_dir`` is claimed as a
            stand-ins folder.
        option (str): how the caller's user named ``out_dir`` (e.g. ``"--assets"``), quoted in a refusal.

    Returns:
        dict: the manifest (keys in the module docstring; paths are absolute ``str``).

    Raises:
        ValueError: if ``teacher_pretrain_steps`` is negative or not an int, or ``folder`` is another folder.
        output_folder.OutputFolderError: ``out_dir`` holds files this function did not write (or another command's
            outputs), or an entry it writes exists in ``folder`` and is not the caller's.
    """
    check_int("teacher_pretrain_steps", teacher_pretrain_steps, 0)
    out_dir = Path(out_dir).resolve()
    if folder is not None and Path(folder.path).resolve() != out_dir:
        raise ValueError(f"folder={str(folder.path)!r} is not out_dir={str(out_dir)!r}: pass the folder claimed for out_dir")
    source_sha = hashlib.sha256(pydoc_text().encode("utf-8")).hexdigest()
    params = {
        "format_version": FORMAT_VERSION,
        "bpe_vocab_size": BPE_VOCAB_SIZE,
        "teacher_shape": TEACHER_SHAPE,
        "student_shape": STUDENT_SHAPE,
        "common": MODEL_COMMON,
        "seeds": SEEDS,
        "data_sizes": DATA_SIZES,
        "teacher_pretrain_steps": teacher_pretrain_steps,
        "source_text_sha256": source_sha,
    }
    manifest_path = out_dir / "manifest.json"
    # Only a build this module recorded in the folder's marker is reused: a manifest.json is never taken for one by
    # its name alone.
    ours = folder.owns("manifest.json") if folder is not None else output_folder.inspect(out_dir).owner == OWNER
    if not force and ours:
        try:
            previous = load_manifest(out_dir)
        except (OSError, ValueError):  # unreadable (e.g. a write cut short): rebuilt below
            previous = None
        # A moved or copied folder is rebuilt in place: its manifest's absolute paths point elsewhere.
        if (
            isinstance(previous, dict)
            and previous.get("params") == params
            and previous.get("root") == str(out_dir)
            and _files_present(previous)
        ):
            return previous
    # Claimed before anything is built: a folder holding a user's files is refused, not written into.
    if folder is None:
        folder = output_folder.claim_output_folder(out_dir, owner=OWNER, option=option)
    folder.claim(*_ENTRIES)
    for name in _ENTRIES:  # the manifest first: a half-removed build never looks complete
        folder.remove(name)

    tokens = build_tokenizer(out_dir / "tokenizer", BPE_VOCAB_SIZE)
    data = build_alpaca_data(out_dir / "data", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["data"], **DATA_SIZES)
    teacher_kwargs, losses = build_model_folder(
        out_dir / "teacher", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["teacher"], **TEACHER_SHAPE,
        **MODEL_COMMON, init_std=0.02, pretrain_steps=teacher_pretrain_steps, pretrain_data=Path(data["train"]),
    )
    student_kwargs, _ = build_model_folder(
        out_dir / "student", tokenizer_dir=out_dir / "tokenizer", seed=SEEDS["student"], **STUDENT_SHAPE,
        **MODEL_COMMON, init_std=0.02, pretrain_steps=0, pretrain_data=None,
    )
    counts = {key: len(json.loads(Path(data[key]).read_text(encoding="utf-8"))) for key in ("train", "eval")}
    heldout = Path(data["heldout_text"]).read_text(encoding="utf-8").strip()
    manifest = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "root": str(out_dir),
        "tokenizer_dir": str(out_dir / "tokenizer"),
        "teacher_dir": str(out_dir / "teacher"),
        "student_dir": str(out_dir / "student"),
        "data": data,
        "num_train": counts["train"],
        "num_eval": counts["eval"],
        "num_heldout": len(heldout.split("\n\n")) if heldout else 0,
        "vocab_size": tokens["vocab_size"],
        "bpe_vocab_size": tokens["bpe_vocab_size"],
        "num_special_tokens": tokens["num_special_tokens"],
        "bos_id": tokens["bos_id"],
        "eos_id": tokens["eos_id"],
        "pad_id": tokens["pad_id"],
        "teacher_kwargs": teacher_kwargs,
        "student_kwargs": student_kwargs,
        "seeds": dict(SEEDS),
        "teacher_pretrain_steps": teacher_pretrain_steps,
        "teacher_pretrain_losses": losses,
        "teacher_pretrain_final_loss": losses[-1] if losses else None,
        "weights_sha256": {
            name: _sha256(out_dir / name / "model.safetensors") for name in ("teacher", "student")
        },
        "source_text_sha256": source_sha,
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }
    write_json(manifest_path, manifest)
    return manifest


def load_manifest(root: Path) -> Optional[dict[str, Any]]:
    """The manifest of an asset folder, or ``None`` when it has none (not built, or a build was interrupted).

    Args:
        root (Path): the folder given to :func:`build_all`.

    Returns:
        Optional[dict]: the manifest.
    """
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _files_present(manifest: dict[str, Any]) -> bool:
    folders = [Path(manifest[key]) for key in ("tokenizer_dir", "teacher_dir", "student_dir")]
    needed = [folders[0] / name for name in TOKENIZER_FILES]
    model_files = ("model.safetensors", "config.json", "generation_config.json", *TOKENIZER_FILES)
    needed += [folder / name for folder in folders[1:] for name in model_files]
    needed += [Path(path) for path in manifest["data"].values()]
    return all(path.is_file() for path in needed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
