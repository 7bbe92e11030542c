"""What a teacher cache was made from: its fingerprint, compared with a training run's config entry by entry.

The fingerprint names everything the cache depends on: the teacher (builder and a SHA-256 of each weight file), the
tokenizer (its settings and files), ``max_seq_len``, the dataset (its config, a SHA-256 of local data files, the item
count and the tokens of evenly spaced items), ``ignore_index``, the vocabulary size, ``k`` and the temperature. Files
whose size and modification time are the recorded ones are not re-hashed (their stamps).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from torchtune_kd.core.checkpointing import checkpoint_file_names

# Evenly spaced items whose tokens go into the fingerprint (all of them for smaller datasets).
FINGERPRINT_ITEMS = 64
_HASH_CHUNK = 1 << 20


def file_sha256(path: Path, stamps: Optional[Mapping[str, Any]] = None, reused: Optional[list[Path]] = None) -> str:
    """SHA-256 of a file's bytes; reused from ``stamps`` when the file's size and modification time are unchanged
    (as ``make`` and ``git`` trust them), so a multi-GB teacher is hashed once, not on every run.

    Args:
        path (Path): the file.
        stamps (Optional[Mapping[str, Any]]): earlier stamps by resolved path (``size``, ``mtime_ns``, ``sha256``).
        reused (Optional[list[Path]]): collects ``path`` when its hash was taken from ``stamps`` unread (so a caller
            can say which files it trusted on size and time).
    """
    path = Path(path)
    stat = path.stat()
    known = (stamps or {}).get(str(path.resolve()))
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        if reused is not None:
            reused.append(path)
        return str(known["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path, sha256: str) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _plain(section: Any) -> Any:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, (DictConfig, ListConfig)) else section


def teacher_files(cfg: Mapping[str, Any]) -> list[Path]:
    """The teacher's weight files named by ``teacher_checkpointer`` (``checkpoint_dir`` / ``checkpoint_files``)."""
    ckpt = cfg["teacher_checkpointer"]
    directory = Path(str(ckpt.get("checkpoint_dir", "")))
    return [directory / name for name in checkpoint_file_names("teacher_checkpointer", ckpt.get("checkpoint_files", []), [])]


def item_hash(tokens: torch.Tensor, labels: torch.Tensor) -> int:
    """A 63-bit hash of one item's real tokens and labels (what the cache's rows were computed from)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(tokens.to(torch.int64).cpu().numpy().tobytes())
    digest.update(labels.to(torch.int64).cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def fingerprint(
    cfg: Mapping[str, Any],
    dataset: Any,
    *,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
    top_k: int,
    stamps: Optional[Mapping[str, Any]] = None,
    hash_teacher: bool = True,
    reused: Optional[list[Path]] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a cache made from ``cfg`` depends on, and the file stamps that let the next check skip re-hashing.

    Args:
        cfg: the distillation config.
        dataset: the built dataset (items are read for the tokenisation hash).
        temperature, ignore_index, vocab_size, top_k: the loss's and models' values.
        stamps: file stamps from an earlier fingerprint (a manifest's), see :func:`file_sha256`.
        hash_teacher: hash the teacher's weight files (``False`` when they are absent: the entry is then ``None``).
        reused: collects the files whose hash was taken from ``stamps`` without reading them.

    Returns:
        tuple[dict, dict]: the fingerprint (JSON-able) and the stamps of every hashed file.
    """
    new_stamps: dict[str, Any] = {}

    def digest(path: Path) -> str:
        value = file_sha256(path, stamps, reused)
        new_stamps[str(Path(path).resolve())] = _stamp(path, value)
        return value

    teacher_model = {k: v for k, v in (_plain(cfg["teacher_model"]) or {}).items() if k != "output_hidden_states"}
    weights = {path.name: digest(path) for path in teacher_files(cfg)} if hash_teacher else None
    tokenizer = _plain(cfg["tokenizer"]) or {}
    tokenizer_files = {
        key: digest(Path(str(tokenizer[key])))
        for key in ("path", "special_tokens_path", "merges_file")
        if tokenizer.get(key) and Path(str(tokenizer[key])).is_file()
    }
    tokenizer_settings = {k: v for k, v in tokenizer.items() if k not in tokenizer_files and k != "max_seq_len"}
    datasets = _plain(cfg["dataset"])
    data_files = {}
    for section in datasets if isinstance(datasets, list) else [datasets]:
        files = (section or {}).get("data_files")
        values = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
        for value in values:
            if value and "://" not in str(value) and Path(str(value)).is_file():
                data_files[str(value)] = digest(Path(str(value)))
    count = len(dataset)
    picks = sorted({round(i * (count - 1) / max(FINGERPRINT_ITEMS - 1, 1)) for i in range(min(count, FINGERPRINT_ITEMS))})
    tokens_digest = hashlib.sha256()
    for index in picks:
        item = dataset[index]
        tokens_digest.update(index.to_bytes(8, "little"))
        tokens_digest.update(item_hash(torch.as_tensor(item["tokens"]), torch.as_tensor(item["labels"])).to_bytes(8, "little"))
    result = {
        "teacher_model": teacher_model,
        "teacher_weights": weights,
        "tokenizer": {"settings": tokenizer_settings, "files": tokenizer_files},
        "max_seq_len": tokenizer.get("max_seq_len"),
        "dataset": {"config": datasets, "files": data_files, "items": count},
        "tokenisation": tokens_digest.hexdigest(),
        "ignore_index": ignore_index,
        "vocab_size": vocab_size,
        "top_k": top_k,
        "temperature": float(temperature),
    }
    return result, new_stamps


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


# What each fingerprint entry means to a user, and how to fix a mismatch.
_MEANING = {
    "teacher_model": ("the teacher model (teacher_model)", "teacher_model"),
    "teacher_weights": ("the teacher's weights (teacher_checkpointer files)", "teacher_checkpointer"),
    "tokenizer": ("the tokenizer (its files or settings)", "tokenizer"),
    "max_seq_len": ("max_seq_len (tokenizer.max_seq_len)", "tokenizer.max_seq_len"),
    "dataset": ("the dataset (its config, data files or number of items)", "dataset"),
    "tokenisation": ("the dataset's tokenisation (the tokens of its items)", "dataset / tokenizer"),
    "ignore_index": ("ignore_index (loss.ignore_index)", "loss"),
    "vocab_size": ("the vocabulary size", "teacher_model.vocab_size"),
    "top_k": ("k (teacher_cache.top_k)", "teacher_cache.top_k"),
    "temperature": ("the temperature (kd_loss.temperature)", "kd_loss.temperature"),
}


def rebuild_hint(path: Path, config_hint: str = "<your config>") -> str:
    """How to rebuild the cache in ``path`` (the pre-pass keeps its whole, current shards and rewrites the rest)."""
    return (
        f"rebuild the cache (tune run recipes/cache_teacher.py --config {config_hint} teacher_cache.path={path} "
        "teacher_cache.overwrite=true)"
    )


def mismatches(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: Path, config_hint: str) -> list[str]:
    """One problem per fingerprint entry that differs, naming it, both values (short) and the fix.

    ``current["teacher_weights"] is None`` (teacher files absent) skips the weights. ``current["top_k"] is None``
    (not set in the config) accepts the cache's.
    """
    problems = []
    rebuild = rebuild_hint(path, config_hint)
    for key, (what, setting) in _MEANING.items():
        mine, theirs = current.get(key), saved.get(key)
        if key == "teacher_weights" and mine is None:
            continue
        if key == "top_k" and mine is None:
            continue
        if mine != theirs:
            shown = "" if key in ("teacher_weights", "tokenisation", "tokenizer", "dataset", "teacher_model") else f" (cache: {theirs!r}, config: {mine!r})"
            if key == "dataset" and isinstance(mine, dict) and isinstance(theirs, dict):
                parts = [part for part in ("config", "files", "items") if mine.get(part) != theirs.get(part)]
                shown = f" ({', '.join(parts)} differ; items: cache {theirs.get('items')}, config {mine.get('items')})"
            elif key == "teacher_weights" and isinstance(mine, dict) and isinstance(theirs, dict):
                changed = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
                shown = f" ({', '.join(changed)} differ)"
            problems.append(
                f"teacher_cache.path={str(path)!r} is stale: {what} differs from what the cache was made from{shown}: "
                f"{rebuild}, or set {setting} back to the cache's"
            )
    return problems
