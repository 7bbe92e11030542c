"""The ``teacher_cache`` config section: its keys, defaults and checks, read into :class:`CacheSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig

KEYS = frozenset({"path", "top_k", "dtype", "samples_per_shard", "batch_size", "overwrite", "verify", "rehash_inputs"})
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULTS = {"top_k": 64, "dtype": "float16", "samples_per_shard": 1024, "batch_size": None, "overwrite": False,
            "verify": "quick", "rehash_inputs": False}
# quick: the pre-flight reads each shard's size and header, the SHA-256 is checked when a shard is first read;
# full: the pre-flight also hashes every shard, so a damaged one is refused before any weights load.
VERIFY_MODES = ("quick", "full")


@dataclass(frozen=True)
class CacheSettings:
    """The ``teacher_cache`` config section.

    Attributes:
        path (Path): the cache folder.
        top_k (Optional[int]): ids kept per token (pre-pass; a training run checks it against the cache's, when set).
        dtype (str): stored log-probability dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        samples_per_shard (int): dataset items per shard file.
        batch_size (Optional[int]): pre-pass batch size (default: the config's ``batch_size``).
        overwrite (bool): the pre-pass may replace a cache made from other inputs (only the cache's own files).
        verify (str): ``quick`` (the pre-flight checks each shard's size and header; its SHA-256 when first read) or
            ``full`` (the pre-flight also checks every shard's SHA-256, before any weights load).
        rehash_inputs (bool): the pre-flight hashes the teacher's weights, tokenizer and data files even when their
            size and modification time equal the ones recorded when the cache was made.
    """

    path: Path
    top_k: Optional[int]
    dtype: str
    samples_per_shard: int
    batch_size: Optional[int]
    overwrite: bool
    verify: str = "quick"
    rehash_inputs: bool = False


def section_problems(section: Any, vocab_size: Optional[int]) -> list[str]:
    """Problems of a ``teacher_cache`` mapping (keys, types, ranges), each naming the key, value and fix."""
    if not isinstance(section, (Mapping, DictConfig)):
        return [f"teacher_cache={section!r} must be a mapping, e.g. teacher_cache: {{path: cache/teacher_top64}}"]
    problems = []
    for key in section.keys():
        if key not in KEYS:
            problems.append(f"unknown key 'teacher_cache.{key}': the keys are {sorted(KEYS)}")
    path = section.get("path", None)
    if not isinstance(path, str) or not path.strip():
        problems.append(f"teacher_cache.path={path!r} must be a folder path (where recipes/cache_teacher.py writes the cache)")
    top_k = section.get("top_k", None)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        problems.append(f"teacher_cache.top_k={top_k!r} must be an integer >= 1 (e.g. 64)")
    elif isinstance(top_k, int) and vocab_size is not None and top_k > vocab_size:
        problems.append(f"teacher_cache.top_k={top_k} exceeds the vocabulary ({vocab_size} tokens): use at most {vocab_size}")
    dtype = section.get("dtype", DEFAULTS["dtype"])
    if dtype not in DTYPES:
        problems.append(f"teacher_cache.dtype={dtype!r} must be one of {sorted(DTYPES)}")
    for key in ("samples_per_shard", "batch_size"):
        value = section.get(key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"teacher_cache.{key}={value!r} must be an integer >= 1")
    for key in ("overwrite", "rehash_inputs"):
        if not isinstance(section.get(key, False), bool):
            problems.append(f"teacher_cache.{key}={section.get(key)!r} must be true or false")
    verify = section.get("verify", DEFAULTS["verify"])
    if verify not in VERIFY_MODES:
        problems.append(
            f"teacher_cache.verify={verify!r} must be 'quick' (shard sizes and headers before training, each shard's "
            "SHA-256 when first read) or 'full' (every shard's SHA-256 before any weights load)"
        )
    return problems


def settings(section: Mapping[str, Any]) -> CacheSettings:
    """Read a validated ``teacher_cache`` section (see :func:`section_problems`)."""
    get = lambda key: section.get(key, DEFAULTS.get(key))  # noqa: E731
    return CacheSettings(
        path=Path(str(section["path"])).expanduser(),
        top_k=section.get("top_k", None),
        dtype=str(get("dtype")),
        samples_per_shard=int(get("samples_per_shard")),
        batch_size=get("batch_size"),
        overwrite=bool(get("overwrite")),
        verify=str(get("verify")),
        rehash_inputs=bool(get("rehash_inputs")),
    )
