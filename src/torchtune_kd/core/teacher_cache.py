"""Teacher cache: the teacher's top-k next-token log-probabilities, computed once and read back by sample id.

``recipes/cache_teacher.py`` runs the teacher over the training data of a distillation config and writes, for every
counted token (a shifted label that is not ``ignore_index``) of every dataset item (a sample, or a pack), the
teacher's ``k`` most probable token ids and their log-probabilities at the loss's temperature, plus the exact log of
the remaining mass (the tail: a ``logsumexp`` over the other logits minus the full log-normaliser, so
``k = vocab`` gives ``-inf`` and the distribution is exact) and the teacher's entropy at T = 1 (the recipe's
diagnostic). A distillation run with ``teacher_cache: {path: DIR}`` then never builds the teacher: each batch's
rows are looked up by the samples' dataset indices, so batch size, shuffling, seeds and gradient accumulation are
free to change.

Layout of ``DIR``::

    .torchtune_kd_outputs.json    the output-folder marker: the entries the pre-pass claimed (and may delete)
    manifest.json                 written last: format, fingerprint (what the cache was made from), each shard's
                                  size and SHA-256, totals
    shard_00000.safetensors       items [0, S), S = samples_per_shard; memory-mapped when read
    shard_00001.safetensors       ...

Each shard holds ``ids`` ``(rows, k)`` int32, ``logprobs`` ``(rows, k)`` (fp16 by default), ``log_tail`` and
``entropy`` ``(rows,)`` fp32, ``offsets`` ``(items + 1,)`` int64 (item ``i``'s rows are
``offsets[i]:offsets[i + 1]``, in token order) and ``item_hash`` ``(items,)`` int64 (a hash of the item's real tokens
and labels, checked at every lookup). Shards are written to a temporary name and renamed, so an interrupted pre-pass
leaves only whole shards, and a rerun continues with the missing ones (the result is identical: a shard's batches
never cross its boundary). The folder is the pre-pass's output folder (:mod:`torchtune_kd.output_folder`, owner
:data:`OWNER`): it writes, replaces and deletes only the entries its marker lists.

Integrity: the manifest records each shard's size and SHA-256. The training pre-flight checks every shard's size and
safetensors header against the manifest before any weights load (``teacher_cache.verify=full``: also the SHA-256);
a shard's SHA-256 is checked when training first reads it; and every looked-up row is checked for what a teacher
distribution must satisfy (:func:`row_defect`), so a damaged shard is refused by name instead of training silently.

The fingerprint names everything the cache depends on: the teacher (builder and a SHA-256 of each weight file), the
tokenizer (its settings and files), ``max_seq_len``, the dataset (its config, a SHA-256 of local data files, the item
count and the tokens of evenly spaced items), ``ignore_index``, the vocabulary size, ``k`` and the temperature. A
distillation run compares it with its own config before anything heavy happens and names what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

import kd_losses
from torchtune_kd.errors import CacheError  # noqa: F401  (raised here; re-exported for callers)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "shard_"
SHARD_SUFFIX = ".safetensors"
KEYS = frozenset({"path", "top_k", "dtype", "samples_per_shard", "batch_size", "overwrite", "verify", "rehash_inputs"})
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULTS = {"top_k": 64, "dtype": "float16", "samples_per_shard": 1024, "batch_size": None, "overwrite": False,
            "verify": "quick", "rehash_inputs": False}
# quick: the pre-flight reads each shard's size and header, the SHA-256 is checked when a shard is first read;
# full: the pre-flight also hashes every shard, so a damaged one is refused before any weights load.
VERIFY_MODES = ("quick", "full")
# The pre-pass's name in its output folder's marker (torchtune_kd.output_folder).
OWNER = "recipes/cache_teacher.py"
# The safetensors dtype names of what a shard stores.
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# A shard's header is a few hundred bytes; anything far larger is not one (a pickle's first 8 bytes read as a length
# are typically astronomically large).
_MAX_HEADER = 1 << 20
# Evenly spaced items whose tokens go into the fingerprint (all of them for smaller datasets).
FINGERPRINT_ITEMS = 64
# Rows per output-projection chunk in the pre-pass (one fp32 chunk of logits at a time).
CHUNK_ROWS = 1024
_HASH_CHUNK = 1 << 20


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
    from omegaconf import DictConfig

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


# ------------------------------------------------------------------------------------------------ fingerprint


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
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(section, resolve=True) if isinstance(section, (DictConfig, ListConfig)) else section


def teacher_files(cfg: Mapping[str, Any]) -> list[Path]:
    """The teacher's weight files named by ``teacher_checkpointer`` (``checkpoint_dir`` / ``checkpoint_files``)."""
    from torchtune_kd.core.checkpointing import checkpoint_file_names

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


# -------------------------------------------------------------------------------------------------- the maths


def topk_rows(logits: torch.Tensor, k: int, temperature: float) -> dict[str, torch.Tensor]:
    """Top-k log-probabilities, exact tail log-mass and entropy (T = 1) of rows of teacher logits.

    Args:
        logits (torch.Tensor): ``(rows, vocab)`` teacher logits (any float dtype; computed in fp32).
        k (int): ids to keep per row.
        temperature (float): the distillation temperature (log-probabilities of ``logits / T``).

    Returns:
        dict: ``ids`` ``(rows, k)`` int32 (most probable first), ``logprobs`` ``(rows, k)`` fp32, ``log_tail``
        ``(rows,)`` fp32 (``-inf`` when nothing is left) and ``entropy`` ``(rows,)`` fp32 (nats, T = 1).
    """
    z = logits.float()
    logp_1 = torch.log_softmax(z, dim=-1)
    entropy = torch.special.entr(logp_1.exp()).sum(-1)
    logp = logp_1 if temperature == 1.0 else torch.log_softmax(z / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    log_tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return {"ids": ids.to(torch.int32), "logprobs": values, "log_tail": log_tail, "entropy": entropy}


# ---------------------------------------------------------------------------------------------------- layout


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def num_shards(num_items: int, samples_per_shard: int) -> int:
    return max(1, math.ceil(num_items / samples_per_shard))


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """The manifest of a complete cache in ``path`` (``None`` when there is none)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"teacher_cache.path={str(path)!r}: {MANIFEST} cannot be read ({err}): rebuild the cache") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CacheError(
            f"teacher_cache.path={str(path)!r}: {MANIFEST} is not a format-{FORMAT_VERSION} teacher cache: rebuild it with "
            "recipes/cache_teacher.py"
        )
    return manifest


# ------------------------------------------------------------------------------------------------- integrity


def shard_sha256(path: Path) -> str:
    """SHA-256 of a shard's bytes (always read: no stamps, a shard is checked for exactly what stamps would miss)."""
    return file_sha256(path)


def _not_safetensors(head: bytes, size: int, length: int) -> str:
    """Why a file whose first 8 bytes give an impossible header length is no shard, naming common impostors."""
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "it is a pickle, not a safetensors shard (it is never unpickled)"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (e.g. a torch.save file), not a safetensors shard (it is never unpickled)"
    return f"it is not a safetensors shard (its first 8 bytes give a header of {length} bytes; the file has {size})"


def _read_header(path: Path) -> tuple[Optional[dict[str, Any]], int, int, Optional[str]]:
    """A safetensors file's JSON header, its length and the file's size, or why the file is not one (no data read)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None, 0, size, f"it is {size} bytes, too short to be a safetensors shard"
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            return None, length, size, _not_safetensors(head, size, length)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None, length, size, "its header is not valid JSON (it is not a safetensors shard)"
    if not isinstance(header, dict):
        return None, length, size, "its header is not a JSON object (it is not a safetensors shard)"
    return header, length, size, None


def _structure_defect(header: dict[str, Any], length: int, size: int) -> Optional[str]:
    """Why a parsed header does not describe a whole teacher-cache shard (its tensors, their sizes, the file size)."""
    meta = header.get("__metadata__")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not isinstance(meta, dict) or meta.get("format") != str(FORMAT_VERSION) or set(tensors) != set(_SHARD_TENSORS):
        return f"it is not a format-{FORMAT_VERSION} teacher-cache shard (its tensors: {sorted(tensors)})"
    itemsize = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}
    spans = []
    try:
        for name, entry in tensors.items():
            shape, (begin, end) = [int(d) for d in entry["shape"]], (int(v) for v in entry["data_offsets"])
            if entry["dtype"] not in _SHARD_TENSORS[name] or len(shape) != (2 if name in ("ids", "logprobs") else 1):
                return f"its tensor {name!r} is {entry['dtype']} {shape}, not what a teacher-cache shard holds"
            if end - begin != math.prod(shape) * itemsize[entry["dtype"]]:
                return f"its tensor {name!r} does not fit its stated size"
            spans.append((begin, end))
            tensors[name] = shape
        rows, k = tensors["ids"]
        items = int(meta["items"])
    except (KeyError, TypeError, ValueError) as err:
        return f"its header is malformed ({type(err).__name__}: {err})"
    if (tensors["logprobs"] != [rows, k] or tensors["log_tail"] != [rows] or tensors["entropy"] != [rows]
            or tensors["offsets"] != [items + 1] or tensors["item_hash"] != [items]):
        return "its tensors' shapes disagree with each other (rows, k, items)"
    spans.sort()
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return "its tensors' byte ranges overlap or leave gaps"
    if size != 8 + length + spans[-1][1]:
        return f"it is {size} bytes but its header describes {8 + length + spans[-1][1]} (truncated or extended)"
    return None


# Tensor name -> the safetensors dtypes it may have (``logprobs``: the cache's ``dtype``, checked separately).
_SHARD_TENSORS = {
    "ids": ("I32",), "logprobs": tuple(_SAFETENSORS_DTYPES.values()), "log_tail": ("F32",), "entropy": ("F32",),
    "offsets": ("I64",), "item_hash": ("I64",),
}


def shard_defect(
    path: Path,
    index: int,
    *,
    digest: str,
    entry: Optional[Mapping[str, Any]] = None,
    dtype: Optional[str] = None,
    top_k: Optional[int] = None,
    first_item: Optional[int] = None,
    items: Optional[int] = None,
    checksum: bool = False,
) -> Optional[str]:
    """Why the file at ``path`` is not shard ``index`` of the cache ``digest`` (``None``: it is), from its header and
    size alone unless ``checksum`` (which reads it whole).

    Args:
        path (Path): the shard file.
        index (int): its shard number.
        digest (str): the cache's fingerprint digest (each shard's metadata names it).
        entry (Optional[Mapping]): the manifest's record of the shard (``bytes``, ``rows``, ``items``, ``sha256``).
        dtype (Optional[str]): the cache's log-probability dtype; top_k: its ``k``; first_item, items: the items the
            shard must cover.
        checksum (bool): compare the file's SHA-256 with ``entry["sha256"]`` (when the manifest records one).

    Returns:
        Optional[str]: the first defect found, phrased to follow "<shard> is damaged: ".
    """
    header, length, size, defect = _read_header(path)
    if defect:
        return defect
    if entry is not None and entry.get("bytes") is not None and size != int(entry["bytes"]):
        return f"it is {size} bytes but the manifest records {entry['bytes']} (truncated, or replaced by another file)"
    defect = _structure_defect(header, length, size)
    if defect:
        return defect
    meta, (rows, k) = header["__metadata__"], header["ids"]["shape"]
    if meta.get("shard") != str(index):
        return f"it is shard {meta.get('shard')} of a cache, not shard {index}"
    if meta.get("fingerprint_digest") != digest:
        return "it belongs to another cache (its fingerprint differs from this cache's)"
    expected = {
        "logprobs dtype": (header["logprobs"]["dtype"], _SAFETENSORS_DTYPES.get(dtype) if dtype else None),
        "k": (k, top_k), "first item": (meta.get("first_item"), None if first_item is None else str(first_item)),
        "items": (meta.get("items"), None if items is None else str(items)),
        "rows": (rows, None if entry is None else entry.get("rows")),
    }
    if entry is not None:
        expected["items (manifest)"] = (int(meta["items"]), entry.get("items"))
    for what, (found, wanted) in expected.items():
        if wanted is not None and found != wanted:
            return f"its {what} is {found}, but this cache's is {wanted}"
    if checksum and entry is not None and entry.get("sha256") and shard_sha256(path) != entry["sha256"]:
        return (
            "its SHA-256 differs from the one recorded when it was written (its bytes changed since: damaged on disk "
            "or in a copy, or edited)"
        )
    return None


def damaged_message(folder: Path, file: str, defect: str, config_hint: str = "<your config>") -> str:
    """The problem line for a damaged shard: the folder, the file, what is wrong, and how to rebuild."""
    return f"teacher_cache.path={str(folder)!r}: {file} is damaged: {defect}: {rebuild_hint(folder, config_hint)}"


def manifest_shard_problem(folder: Path, manifest: Mapping[str, Any], config_hint: str = "<your config>") -> Optional[str]:
    """Why the manifest's shard list cannot be this cache's (its count and names follow from its item count)."""
    try:
        expected = [shard_name(i) for i in range(num_shards(int(manifest["num_items"]), int(manifest["samples_per_shard"])))]
        listed = [entry["file"] for entry in manifest["shards"]]
    except (KeyError, TypeError, ValueError):
        listed, expected = None, []
    if listed != expected:
        return (
            f"teacher_cache.path={str(folder)!r}: {MANIFEST} is damaged (its shard list does not match its item count): "
            f"{rebuild_hint(folder, config_hint)}"
        )
    return None


def shard_problems(
    folder: Path, manifest: Mapping[str, Any], *, checksum: bool = False, config_hint: str = "<your config>"
) -> list[str]:
    """Problems of a complete cache's shard files against its manifest: missing, truncated, foreign, replaced by junk or
    a pickle (header and size, milliseconds per shard), and with ``checksum`` changed bytes (SHA-256, reads all).

    Nothing is loaded (a pickle is recognised, never unpickled); this runs in the pre-flight, before any weights load.
    """
    folder = Path(folder)
    problem = manifest_shard_problem(folder, manifest, config_hint)
    if problem:
        return [problem]
    problems, damaged = [], []
    missing = [entry["file"] for entry in manifest["shards"] if not (folder / entry["file"]).is_file()]
    if missing:
        problems.append(f"teacher_cache.path={str(folder)!r} lacks {', '.join(missing[:3])}: {rebuild_hint(folder, config_hint)}")
    for index, entry in enumerate(manifest["shards"]):
        if entry["file"] in missing:
            continue
        defect = shard_defect(
            folder / entry["file"], index, digest=manifest.get("fingerprint_digest"), entry=entry, dtype=manifest.get("dtype"),
            top_k=manifest.get("top_k"), checksum=checksum,
        )
        if defect:
            damaged.append(damaged_message(folder, entry["file"], defect, config_hint))
    if len(damaged) > 3:
        damaged = damaged[:3] + [f"teacher_cache.path={str(folder)!r}: {len(damaged) - 3} more shard(s) are damaged"]
    return problems + damaged


# Slack on "log-probability <= 0": log_softmax never exceeds 0 and rounding to a storage dtype keeps the sign.
LOGPROB_SLACK = 1e-6
# Slack on the entropy's range [0, log V] (an fp32 sum over the vocabulary).
ENTROPY_SLACK = 1e-3


def sum_tolerance(dtype: str, k: int) -> float:
    """How far a stored row's total probability (top k plus tail) may stray from 1.

    Each log-probability is rounded to ``dtype`` (absolute error <= |log p| * eps / 2, so p moves by at most
    p * |log p| * eps / 2), and the sum of p * |log p| over the top k is at most the entropy of k + 1 outcomes,
    log(k + 1); twice that bound plus fp32 slack: 4.3e-3 for fp16 at k = 64, 3.3e-2 for bf16, 1e-4 for fp32.
    """
    return torch.finfo(DTYPES[dtype]).eps * math.log(k + 1) + 1e-4


def row_defect(
    ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, entropy: torch.Tensor, *,
    vocab_size: Optional[int], dtype: str,
) -> Optional[tuple[int, str]]:
    """The first stored row that cannot be a teacher distribution, and why (``None``: all can).

    A few vectorised passes over ``(rows, k)``: every log-probability and the tail's are <= 0 and not NaN (-inf is a
    zero probability, allowed), the top-k probabilities plus the tail sum to 1 within :func:`sum_tolerance`, ids lie
    in ``[0, vocab_size)`` and the entropy in ``[0, log vocab_size]``. A flipped sign, a NaN, an exponent bit or
    random bytes in a row break at least one of them.
    """
    if ids.shape[0] == 0:
        return None
    lp, tail, ent = logprobs.float(), log_tail.float(), entropy.float()
    k = ids.shape[-1]
    tolerance = sum_tolerance(dtype, k)
    upper = math.log(vocab_size) + ENTROPY_SLACK if vocab_size else math.inf
    # Row reductions, not element masks: max and sum propagate a NaN, and "not <=" is true for one.
    total = lp.exp().sum(-1) + tail.exp()
    bad = ~(lp.amax(-1) <= LOGPROB_SLACK) | ~(tail <= LOGPROB_SLACK) | (ids.amin(-1) < 0)
    if vocab_size:
        bad |= ids.amax(-1) >= vocab_size
    bad |= ~((total - 1).abs() <= tolerance) | ~((ent >= -ENTROPY_SLACK) & (ent <= upper))
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    row_lp, row_ids = lp[row], ids[row]
    if row_lp.isnan().any() or tail[row].isnan():
        return row, "it holds a NaN log-probability"
    if (row_lp > LOGPROB_SLACK).any():
        j = int((row_lp > LOGPROB_SLACK).nonzero()[0, 0])
        return row, f"the log-probability of token {int(row_ids[j])} is {float(row_lp[j]):+.4g} > 0 (a probability above 1)"
    if tail[row] > LOGPROB_SLACK:
        return row, f"its tail log-mass is {float(tail[row]):+.4g} > 0 (a probability above 1)"
    out = (row_ids < 0) | (row_ids >= vocab_size) if vocab_size else row_ids < 0
    if out.any():
        return row, f"token id {int(row_ids[out][0])} is outside the vocabulary [0, {vocab_size or 'V'})"
    if not abs(float(total[row]) - 1) <= tolerance:
        return row, (
            f"its probabilities (top {k} plus the tail) sum to {float(total[row]):.6g}, not 1 (tolerance {tolerance:.2g} "
            f"for {dtype})"
        )
    return row, f"its entropy {float(ent[row]):.4g} is outside [0, log V = {upper - ENTROPY_SLACK:.4g}]"


# ------------------------------------------------------------------------------------ the pre-pass's folder


def _shard_state(path: Path, index: int, cache: CacheSettings, digest: str, num_items: int) -> str:
    """``absent``, ``current`` (a whole shard of this cache, settings included), ``other`` (a whole shard of another
    cache, or of this one with another dtype or samples_per_shard) or ``damaged``."""
    if not path.is_file():
        return "absent"
    header, length, size, defect = _read_header(path)
    if defect or _structure_defect(header, length, size):
        return "damaged"
    first = index * cache.samples_per_shard
    defect = shard_defect(path, index, digest=digest, dtype=cache.dtype, first_item=first,
                          items=min(cache.samples_per_shard, num_items - first))
    return "current" if defect is None else "other"


def completed_shards(cache: CacheSettings, digest: str, num_items: int) -> list[int]:
    """Indices of the whole shards of ``cache.path`` written for the fingerprint ``digest`` (read-only)."""
    return [
        index for index in range(num_shards(num_items, cache.samples_per_shard))
        if _shard_state(cache.path / shard_name(index), index, cache, digest, num_items) == "current"
    ]


def _complete(cache: CacheSettings, digest: str, num_items: int, written: list[str]) -> bool:
    """``cache.path`` holds this command's whole cache for ``digest``, every shard's SHA-256 as recorded."""
    if MANIFEST not in written:
        return False
    try:
        manifest = read_manifest(cache.path)
    except CacheError:
        return False
    if (manifest is None or manifest.get("fingerprint_digest") != digest or manifest.get("dtype") != cache.dtype
            or manifest.get("samples_per_shard") != cache.samples_per_shard or manifest.get("num_items") != num_items
            or manifest_shard_problem(cache.path, manifest)):
        return False
    return all(
        entry["file"] in written and (cache.path / entry["file"]).is_file()
        and shard_defect(cache.path / entry["file"], index, digest=digest, entry=entry, dtype=cache.dtype, checksum=True) is None
        for index, entry in enumerate(manifest["shards"])
    )


def prepare_folder(cache: CacheSettings, digest: str, num_items: int) -> tuple[str, list[str]]:
    """Make ``cache.path`` ready for the pre-pass: ``("done", [])`` (a complete cache for ``digest``, every shard's
    checksum verified; nothing is written) or ``("write", damaged)``.

    The folder is claimed as the pre-pass's output folder (:mod:`torchtune_kd.output_folder`, owner :data:`OWNER`)
    and every shard name and the manifest are claimed before anything is deleted, so a name held by a file the
    pre-pass did not write stops it first. Whole shards written for ``digest`` are kept (the pre-pass resumes); its
    own damaged shards and half-written temporaries are removed (``damaged`` names them); its own cache made from
    other inputs is removed only with ``overwrite``. Nothing else is ever deleted, whatever its name.

    Raises:
        CacheError: the folder is a file, another command's, holds files the pre-pass did not write (without
            ``overwrite``) or one under a name it needs, or a cache made from other inputs (without ``overwrite``).
    """
    from torchtune_kd import output_folder

    folder = cache.path
    names = [shard_name(index) for index in range(num_shards(num_items, cache.samples_per_shard))]
    report = output_folder.inspect(folder)
    if report.owner == OWNER and _complete(cache, digest, num_items, report.written):
        return "done", []
    try:
        owned = output_folder.claim_output_folder(
            folder, owner=OWNER, option="teacher_cache.path", overwrite=cache.overwrite,
            overwrite_hint="teacher_cache.overwrite=true",
        )
        owned.claim(*names, MANIFEST)
    except output_folder.OutputFolderError as err:
        raise CacheError(str(err)) from None
    owned.remove_temporaries()
    try:
        manifest = read_manifest(folder)
    except CacheError:  # its own manifest, unreadable: nothing to keep
        manifest = {}
    states = {name: _shard_state(folder / name, index, cache, digest, num_items) for index, name in enumerate(names)}
    recorded = {}
    if manifest and manifest.get("fingerprint_digest") == digest and isinstance(manifest.get("shards"), list):
        recorded = {entry.get("file"): entry for entry in manifest["shards"] if isinstance(entry, dict)}
    for name, state in states.items():
        # A shard the manifest recorded is kept only with the bytes it recorded (random bytes inside keep the size).
        if state == "current" and recorded.get(name, {}).get("sha256") and shard_sha256(folder / name) != recorded[name]["sha256"]:
            states[name] = "damaged"
    leftovers = [name for name in owned.written if name not in names and name != MANIFEST and (folder / name).exists()]
    other = (
        (manifest is not None and manifest and (manifest.get("fingerprint_digest") != digest
                                                or manifest.get("dtype") != cache.dtype
                                                or manifest.get("samples_per_shard") != cache.samples_per_shard))
        or "other" in states.values() or bool(leftovers)
    )
    if other and not cache.overwrite:
        raise CacheError(
            f"teacher_cache.path={str(folder)!r} holds a cache made from other inputs or settings (teacher, tokenizer, "
            "data, max_seq_len, k, temperature, dtype or samples_per_shard differ): set teacher_cache.overwrite=true to "
            "replace it, or choose another folder"
        )
    damaged = [name for name, state in states.items() if state == "damaged"]
    for name in [*(n for n, state in states.items() if state in ("other", "damaged")), *leftovers]:
        owned.remove(name)
    if manifest is not None:
        owned.remove(MANIFEST)
    return "write", damaged


def write_shard(folder: Path, index: int, rows: Sequence[dict[str, torch.Tensor]], hashes: Sequence[int], *,
                dtype: str, digest: str, first_item: int) -> int:
    """Write one shard atomically (temporary name, then rename); returns its size in bytes.

    ``folder`` is the pre-pass's claimed output folder and the shard's name already claimed (:func:`prepare_folder`).
    """
    from safetensors.torch import save_file

    counts = [int(r["ids"].shape[0]) for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {
        "ids": torch.cat([r["ids"] for r in rows]).contiguous(),
        "logprobs": torch.cat([r["logprobs"] for r in rows]).to(DTYPES[dtype]).contiguous(),
        "log_tail": torch.cat([r["log_tail"] for r in rows]).float().contiguous(),
        "entropy": torch.cat([r["entropy"] for r in rows]).float().contiguous(),
        "offsets": offsets,
        "item_hash": torch.tensor(list(hashes), dtype=torch.int64),
    }
    final = Path(folder) / shard_name(index)
    tmp = final.with_name(f".{final.name}.tmp")
    save_file(tensors, str(tmp), metadata={
        "format": str(FORMAT_VERSION), "fingerprint_digest": digest, "shard": str(index),
        "first_item": str(first_item), "items": str(len(rows)),
    })
    os.replace(tmp, final)
    return final.stat().st_size


def write_manifest(folder: Path, *, fingerprint_: Mapping[str, Any], stamps: Mapping[str, Any], settings_: CacheSettings,
                   num_items: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` (atomically) once every shard exists, with each shard's size and SHA-256; returns it."""
    from safetensors import safe_open

    shards, rows, size, tail_mass = [], 0, 0, 0.0
    for index in range(num_shards(num_items, settings_.samples_per_shard)):
        path = Path(folder) / shard_name(index)
        with safe_open(str(path), framework="pt") as handle:
            shard_rows = int(handle.get_slice("log_tail").get_shape()[0])
            items = int(handle.metadata()["items"])
            tail_mass += float(handle.get_tensor("log_tail").double().exp().sum())
        shards.append({"file": path.name, "first_item": index * settings_.samples_per_shard, "items": items,
                       "rows": shard_rows, "bytes": path.stat().st_size, "sha256": shard_sha256(path)})
        rows += shard_rows
        size += path.stat().st_size
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": dict(fingerprint_),
        "fingerprint_digest": fingerprint_digest(fingerprint_),
        "file_stamps": dict(stamps),
        "top_k": fingerprint_["top_k"],
        "temperature": fingerprint_["temperature"],
        "dtype": settings_.dtype,
        "samples_per_shard": settings_.samples_per_shard,
        "num_items": num_items,
        "num_rows": rows,
        "bytes": size,
        "bytes_per_token": size / max(rows, 1),
        # How much of the teacher's mass lies outside its top k, on average: what a smaller k gives up.
        "mean_tail_mass": tail_mass / max(rows, 1),
        "shards": shards,
        **dict(extra),
    }
    tmp = Path(folder) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, Path(folder) / MANIFEST)
    return manifest


# --------------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """Read access to a complete cache: each batch's teacher rows by sample id, checked against the batch.

    Shards are opened when first read: each is then checked whole once (size, header and the SHA-256 the pre-pass
    recorded), and every batch's rows are checked for what a teacher distribution must satisfy (:func:`row_defect`).

    Args:
        path (Path): the cache folder (its manifest must exist).
        ignore_index (int): label value of tokens without a row.

    Raises:
        CacheError: no complete cache in ``path``, or a damaged manifest.
    """

    def __init__(self, path: Path, ignore_index: int = -100) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(
                f"teacher_cache.path={str(self.path)!r} holds no complete teacher cache (no {MANIFEST}): run "
                "tune run recipes/cache_teacher.py --config <your config> first"
            )
        problem = manifest_shard_problem(self.path, manifest)
        if problem:
            raise CacheError(problem)
        self.manifest = manifest
        self.k = int(manifest["top_k"])
        self.temperature = float(manifest["temperature"])
        self.samples_per_shard = int(manifest["samples_per_shard"])
        self.num_items = int(manifest["num_items"])
        self.vocab_size: Optional[int] = (manifest.get("fingerprint") or {}).get("vocab_size")
        self.ignore_index = ignore_index
        count = len(manifest["shards"])
        self._shards: list[Any] = [None] * count
        self._offsets: list[Optional[torch.Tensor]] = [None] * count
        self._hashes: list[Optional[torch.Tensor]] = [None] * count

    def _damaged(self, file: str, defect: str) -> CacheError:
        return CacheError(damaged_message(self.path, file, defect))

    def _open(self, shard: int) -> Any:
        """The shard's memory-mapped handle; the first call checks the file whole (it is read once to hash it)."""
        if self._shards[shard] is not None:
            return self._shards[shard]
        from safetensors import safe_open

        entry = self.manifest["shards"][shard]
        path = self.path / entry["file"]
        if not path.is_file():
            raise CacheError(f"teacher_cache.path={str(self.path)!r} lacks {entry['file']}: {rebuild_hint(self.path)}")
        defect = shard_defect(path, shard, digest=self.manifest.get("fingerprint_digest"), entry=entry,
                              dtype=self.manifest["dtype"], top_k=self.k, checksum=True)
        if defect:
            raise self._damaged(entry["file"], defect)
        try:
            handle = safe_open(str(path), framework="pt")
            offsets, hashes = handle.get_tensor("offsets"), handle.get_tensor("item_hash")
            rows = int(handle.get_slice("ids").get_shape()[0])
        except Exception as err:  # safetensors' own errors: the message says what it could not read
            raise self._damaged(entry["file"], f"it cannot be read ({type(err).__name__}: {err})") from None
        if int(offsets[0]) != 0 or int(offsets[-1]) != rows or bool((offsets[1:] < offsets[:-1]).any()):
            raise self._damaged(entry["file"], "its item offsets do not run from 0 up to its row count")
        self._shards[shard], self._offsets[shard], self._hashes[shard] = handle, offsets, hashes
        return handle

    def item_rows(self, item: int) -> dict[str, torch.Tensor]:
        """The cached rows of one dataset item (read from the memory-mapped shard)."""
        if not 0 <= item < self.num_items:
            raise CacheError(f"sample {item} is not in the teacher cache ({self.num_items} items): the dataset changed; rebuild the cache")
        shard, local = divmod(item, self.samples_per_shard)
        handle = self._open(shard)
        start, end = (int(v) for v in self._offsets[shard][local: local + 2])
        return {name: handle.get_slice(name)[start:end] for name in ("ids", "logprobs", "log_tail", "entropy")}

    def lookup(
        self, sample_ids: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, real_tokens: torch.Tensor,
        unshifted_labels: torch.Tensor,
    ) -> tuple[kd_losses.TeacherTopK, torch.Tensor]:
        """The teacher's top-k distributions and entropies of one batch, on the labels' device.

        Args:
            sample_ids (torch.Tensor): ``(bsz,)`` dataset indices of the batch's items.
            labels (torch.Tensor): ``(bsz, seq_len)`` shifted labels (rows sit where they are not ignored).
            tokens (torch.Tensor): ``(bsz, seq_len)`` input ids, with ``real_tokens`` and ``unshifted_labels`` to
                check each item against the hash it was cached from.
            real_tokens (torch.Tensor): ``(bsz, seq_len)`` bool.
            unshifted_labels (torch.Tensor): ``(bsz, seq_len)`` the collated labels.

        Returns:
            tuple: a :class:`kd_losses.TeacherTopK` ``(bsz, seq_len, k)`` (uniform placeholders at ignored positions)
            and the teacher's entropy ``(bsz, seq_len)`` (0 at ignored positions).

        Raises:
            CacheError: an item's tokens or its number of counted tokens differ from the cache's, or a shard is
                damaged (its checksum at first read, or a row that is no distribution), naming the shard and item.
        """
        bsz, seq_len = labels.shape
        k = self.k
        keep = (labels != self.ignore_index).cpu()
        cpu_tokens, cpu_real, cpu_labels = tokens.cpu(), real_tokens.cpu(), unshifted_labels.cpu()
        items = sample_ids.tolist()
        parts = []
        for b, item in enumerate(items):
            shard, local = divmod(item, self.samples_per_shard)
            if not 0 <= item < self.num_items:
                self.item_rows(item)  # raises with the message
            self._open(shard)
            expected = int(self._hashes[shard][local])
            real = cpu_real[b]
            if item_hash(cpu_tokens[b][real], cpu_labels[b][real]) != expected:
                raise CacheError(
                    f"sample {item}'s tokens differ from the ones the teacher cache in {str(self.path)!r} was made from: "
                    "the dataset or its tokenisation changed; rebuild the cache (recipes/cache_teacher.py with "
                    "teacher_cache.overwrite=true)"
                )
            rows = self.item_rows(item)
            counted = int(keep[b].sum())
            if counted != rows["ids"].shape[0]:
                raise CacheError(
                    f"sample {item} has {counted} counted tokens but the teacher cache holds "
                    f"{rows['ids'].shape[0]}: the data or max_seq_len changed; rebuild the cache"
                )
            parts.append(rows)
        # One vectorised check of the whole batch's rows, on the training device (cheapest there), in the order
        # boolean indexing places them (item by item, token by token).
        device = labels.device
        rows = {
            name: torch.cat([part[name] for part in parts]).to(device)
            for name in ("ids", "logprobs", "log_tail", "entropy")
        }
        bad = row_defect(rows["ids"], rows["logprobs"], rows["log_tail"], rows["entropy"], vocab_size=self.vocab_size,
                         dtype=self.manifest["dtype"])
        if bad is not None:
            row, reason = bad
            ends = torch.tensor([part["ids"].shape[0] for part in parts]).cumsum(0)
            b = int((ends <= row).sum())
            item, first = items[b], int(ends[b - 1]) if b else 0
            shard = item // self.samples_per_shard
            raise self._damaged(
                shard_name(shard),
                f"sample {item} (its counted token {row - first}) holds no teacher distribution: {reason}",
            )
        ids = torch.arange(k, dtype=torch.int32, device=device).expand(bsz, seq_len, k).clone()
        logprobs = torch.zeros(bsz, seq_len, k, dtype=DTYPES[self.manifest["dtype"]], device=device)
        log_tail = torch.zeros(bsz, seq_len, dtype=torch.float32, device=device)
        entropy = torch.zeros(bsz, seq_len, dtype=torch.float32, device=device)
        keep = keep.to(device)
        ids[keep], logprobs[keep], log_tail[keep], entropy[keep] = (
            rows["ids"], rows["logprobs"], rows["log_tail"], rows["entropy"]
        )
        return kd_losses.TeacherTopK(ids, logprobs, log_tail, self.temperature), entropy


def _listing(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_cache(
    cfg: Mapping[str, Any], dataset: Any, *, temperature: float, ignore_index: int, vocab_size: int,
    config_hint: str = "<your config>",
) -> tuple[list[str], list[str]]:
    """Problems and notices of a training run's ``teacher_cache`` against its config (nothing heavy is loaded).

    Checks the manifest, the fingerprint (see :func:`fingerprint`; files whose size and modification time are the
    recorded ones are not re-hashed unless ``teacher_cache.rehash_inputs``, and a notice names them) and every shard
    file against the manifest (:func:`shard_problems`: sizes and headers, and with ``teacher_cache.verify=full`` the
    SHA-256s), so a missing, truncated, foreign or pickled shard stops the run before any weights load.

    Returns:
        tuple[list[str], list[str]]: problems (missing, incomplete, stale or damaged cache) and notices.
    """
    cache = settings(cfg["teacher_cache"])
    try:
        manifest = read_manifest(cache.path)
    except CacheError as err:
        return [str(err)], []
    if manifest is None:
        return [
            f"teacher_cache.path={str(cache.path)!r} holds no complete teacher cache: run "
            f"tune run recipes/cache_teacher.py --config {config_hint} teacher_cache.path={cache.path} first (or remove "
            "teacher_cache to distil from the live teacher)"
        ], []
    notices = []
    present = all(path.is_file() for path in teacher_files(cfg))
    if not present:
        notices.append(
            "teacher_cache: the teacher's weight files are absent, so the cache's teacher cannot be verified against "
            "them (everything else is)"
        )
    reused: list[Path] = []
    current, _ = fingerprint(
        cfg, dataset, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size, top_k=cache.top_k,
        stamps=None if cache.rehash_inputs else manifest.get("file_stamps"), hash_teacher=present, reused=reused,
    )
    if reused:
        notices.append(
            f"teacher_cache: not re-hashed, as their size and modification time are the ones recorded when the cache "
            f"was made: {_listing([str(path) for path in reused])} (a file replaced with the same size and time would "
            "go unnoticed); set teacher_cache.rehash_inputs=true to hash them"
        )
    problems = mismatches(manifest["fingerprint"], current, path=cache.path, config_hint=config_hint)
    problems += shard_problems(cache.path, manifest, checksum=cache.verify == "full", config_hint=config_hint)
    if not all(isinstance(entry, dict) and entry.get("sha256") for entry in manifest.get("shards") or []):
        notices.append(
            f"teacher_cache.path={str(cache.path)!r} records no shard checksums (made by an earlier version): its "
            "shards are checked by size, header and row only; to add them, rebuild it into a new folder (tune run "
            f"recipes/cache_teacher.py --config {config_hint} teacher_cache.path=<new folder>)"
        )
    return problems, notices


def describe(manifest: Mapping[str, Any]) -> str:
    """One line about a cache: items, rows, k, temperature, dtype, size per token and mean tail mass."""
    return (
        f"{manifest['num_items']} items, {manifest['num_rows']} token rows, k={manifest['top_k']}, "
        f"T={manifest['temperature']}, {manifest['dtype']}, {manifest['bytes'] / 2**20:.1f} MiB "
        f"({manifest['bytes_per_token']:.0f} bytes/token), mean teacher mass outside the top k "
        f"{manifest.get('mean_tail_mass', float('nan')):.3f}"
    )


def iter_shard_batches(first: int, end: int, batch_size: int) -> Iterable[list[int]]:
    """Item indices of one shard in batches that never cross the shard's end (so a rerun reproduces it)."""
    for start in range(first, end, batch_size):
        yield list(range(start, min(start + batch_size, end)))
