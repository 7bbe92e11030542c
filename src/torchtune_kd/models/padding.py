"""Pad a Hugging Face checkpoint's vocabulary rows: a same-tokenizer teacher with a larger padded vocabulary.

Families pad their embedding and output layers past the tokenizer (Qwen2.5-7B to 152,064 rows, Qwen2.5-0.5B to
151,936); the padding rows are initialised and never trained, because no tokenizer emits their ids. This writes
such a teacher from any single-file Llama-style checkpoint: ``rows`` more rows in the token embedding and (when
untied) the output layer, drawn from a seeded normal with ``std`` (default: the trained rows' own standard
deviation, so the padding logits are neither negligible nor dominant), and ``vocab_size`` raised in ``config.json``.
Used by the tests and the padded-teacher evidence (``core.vocabularies``).

The output folder follows :mod:`torchtune_kd.output_folder` (new, empty, or this command's own).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from torchtune_kd import output_folder

OWNER = "torchtune_kd.models.padding"
#: Hugging Face Llama names of the two vocabulary-sized matrices.
EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"
WEIGHTS = "model.safetensors"


def pad_vocabulary(
    checkpoint_dir: Union[str, Path],
    out_dir: Union[str, Path],
    rows: int,
    *,
    seed: int = 0,
    std: Optional[float] = None,
    owner: str = OWNER,
    option: str = "out_dir",
    overwrite: bool = False,
) -> Path:
    """Write ``checkpoint_dir``'s model with ``rows`` padding rows appended to its vocabulary.

    Args:
        checkpoint_dir (Union[str, Path]): a folder with ``model.safetensors`` and ``config.json`` (its other files,
            e.g. the tokenizer's, are copied).
        out_dir (Union[str, Path]): the new folder (new, empty, or ``owner``'s own).
        rows (int): padding rows to add (at least 1).
        seed (int): seed of the padding rows' values.
        std (Optional[float]): their standard deviation; ``None``: that of the embedding's trained rows.
        owner (str): the command the folder is claimed for.
        option (str): how the caller's user named ``out_dir``, quoted in a refusal.
        overwrite (bool): write into a folder holding other files (they are never replaced).

    Returns:
        Path: ``out_dir``.

    Raises:
        ValueError: ``rows < 1``, a missing file, or no embedding in the checkpoint.
        output_folder.OutputFolderError: the folder holds files this command did not write.
    """
    source = Path(checkpoint_dir)
    if rows < 1:
        raise ValueError(f"rows={rows}: pad by at least 1 row")
    for name in (WEIGHTS, "config.json"):
        if not (source / name).is_file():
            raise ValueError(f"{source / name} is missing: pad_vocabulary reads a single-file safetensors checkpoint")
    # The folder first: a refusal comes before the weights load.
    folder = output_folder.claim_output_folder(out_dir, owner=owner, option=option, overwrite=overwrite,
                                               overwrite_hint="--overwrite")
    state = load_file(str(source / WEIGHTS))
    if EMBEDDING not in state:
        raise ValueError(f"{source / WEIGHTS} has no {EMBEDDING!r}: not a Llama-style checkpoint")
    config = json.loads((source / "config.json").read_text())
    embedding = state[EMBEDDING]
    scale = float(embedding.float().std()) if std is None else std
    generator = torch.Generator().manual_seed(seed)
    for name in (EMBEDDING, OUTPUT):
        if name in state:
            weight = state[name]
            extra = torch.randn(rows, weight.shape[1], generator=generator) * scale
            state[name] = torch.cat([weight, extra.to(weight.dtype)]).contiguous()
    config["vocab_size"] = int(embedding.shape[0]) + rows

    others = [p for p in source.iterdir() if p.is_file() and p.name not in (WEIGHTS, "config.json")
              and not p.name.startswith(".")]
    folder.claim(WEIGHTS, "config.json", *(p.name for p in others))
    save_file(state, str(folder.path_of(WEIGHTS)), metadata={"format": "pt"})
    folder.path_of("config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in others:
        shutil.copyfile(path, folder.path_of(path.name))
    return Path(out_dir)
