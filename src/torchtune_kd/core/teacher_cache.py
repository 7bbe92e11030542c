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

    manifest.json                 written last: format, fingerprint (what the cache was made from), shards, totals
    shard_00000.safetensors       items [0, S), S = samples_per_shard; memory-mapped when read
    shard_00001.safetensors       ...

Each shard holds ``ids`` ``(rows, k)`` int32, ``logprobs`` ``(rows, k)`` (fp16 by default), ``log_tail`` and
``entropy`` ``(rows,)`` fp32, ``offsets`` ``(items + 1,)`` int64 (item ``i``'s rows are
``offsets[i]:offsets[i + 1]``, in token order) and ``item_hash`` ``(items,)`` int64 (a hash of the item's real tokens
and labels, checked at every lookup). Shards are written to a temporary name and renamed, so an interrupted pre-pass
leaves only whole shards, and a rerun continues with the missing ones (the result is identical: a shard's batches
never cross its boundary).

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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

import kd_losses

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "shard_"
SHARD_SUFFIX = ".safetensors"
KEYS = frozenset({"path", "top_k", "dtype", "samples_per_shard", "batch_size", "overwrite"})
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULTS = {"top_k": 64, "dtype": "float16", "samples_per_shard": 1024, "batch_size": None, "overwrite": False}
# Evenly spaced items whose tokens go into the fingerprint (all of them for smaller datasets).
FINGERPRINT_ITEMS = 64
# Rows per output-projection chunk in the pre-pass (one fp32 chunk of logits at a time).
CHUNK_ROWS = 1024
_HASH_CHUNK = 1 << 20


class CacheError(ValueError):
    """A teacher cache that cannot be used or written; the message names the key, the value and the fix."""


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
    """

    path: Path
    top_k: Optional[int]
    dtype: str
    samples_per_shard: int
    batch_size: Optional[int]
    overwrite: bool


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
    if not isinstance(section.get("overwrite", False), bool):
        problems.append(f"teacher_cache.overwrite={section.get('overwrite')!r} must be true or false")
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
    )


# ------------------------------------------------------------------------------------------------ fingerprint


def file_sha256(path: Path, stamps: Optional[Mapping[str, Any]] = None) -> str:
    """SHA-256 of a file's bytes; reused from ``stamps`` when the file's size and modification time are unchanged
    (as ``make`` and ``git`` trust them), so a multi-GB teacher is hashed once, not on every run."""
    path = Path(path)
    stat = path.stat()
    known = (stamps or {}).get(str(path.resolve()))
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
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
    from torchtune_kd.core.preflight import _checkpoint_names

    ckpt = cfg["teacher_checkpointer"]
    directory = Path(str(ckpt.get("checkpoint_dir", "")))
    return [directory / name for name in _checkpoint_names("teacher_checkpointer", ckpt.get("checkpoint_files", []), [])]


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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a cache made from ``cfg`` depends on, and the file stamps that let the next check skip re-hashing.

    Args:
        cfg: the distillation config.
        dataset: the built dataset (items are read for the tokenisation hash).
        temperature, ignore_index, vocab_size, top_k: the loss's and models' values.
        stamps: file stamps from an earlier fingerprint (a manifest's), see :func:`file_sha256`.
        hash_teacher: hash the teacher's weight files (``False`` when they are absent: the entry is then ``None``).

    Returns:
        tuple[dict, dict]: the fingerprint (JSON-able) and the stamps of every hashed file.
    """
    new_stamps: dict[str, Any] = {}

    def digest(path: Path) -> str:
        value = file_sha256(path, stamps)
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


def mismatches(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: Path, config_hint: str) -> list[str]:
    """One problem per fingerprint entry that differs, naming it, both values (short) and the fix.

    ``current["teacher_weights"] is None`` (teacher files absent) skips the weights. ``current["top_k"] is None``
    (not set in the config) accepts the cache's.
    """
    problems = []
    rebuild = f"rebuild the cache (tune run recipes/cache_teacher.py --config {config_hint} teacher_cache.path={path} teacher_cache.overwrite=true)"
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


# --------------------------------------------------------------------------------------------------- writing


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def num_shards(num_items: int, samples_per_shard: int) -> int:
    return max(1, math.ceil(num_items / samples_per_shard))


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _own_files(folder: Path) -> list[Path]:
    """The files a cache writes into its folder (manifest, shards, their temporaries)."""
    return [
        p for p in folder.iterdir()
        if p.name in (MANIFEST, f".{MANIFEST}.tmp")
        or (p.name.lstrip(".").startswith(SHARD_PREFIX) and SHARD_SUFFIX in p.name)
    ]


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


def completed_shards(folder: Path, digest: str) -> list[int]:
    """Indices of the whole shards in ``folder`` written for the fingerprint ``digest`` (read-only)."""
    return [index for index, meta in _shard_metadata(folder) if meta.get("fingerprint_digest") == digest]


def _shard_metadata(folder: Path) -> list[tuple[Optional[int], dict[str, str]]]:
    from safetensors import safe_open

    found = []
    for path in sorted(Path(folder).glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
            index = int(meta["shard"])
        except Exception:  # not even a readable shard: the cache's own file, damaged
            meta, index = {}, None
        found.append((index, meta))
    return found


def prepare_folder(cache: CacheSettings, digest: str) -> str:
    """Make ``cache.path`` ready for the pre-pass: ``"done"`` (a complete cache for ``digest``) or ``"write"``.

    Whole shards written for ``digest`` are kept (the pre-pass resumes); half-written temporaries are removed. Only
    the cache's own files are ever removed, and those of a cache made from other inputs only with ``overwrite``.

    Raises:
        CacheError: the folder holds other files, or a cache made from other inputs without ``overwrite``.
    """
    folder = cache.path
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"teacher_cache.path={str(folder)!r} is a file: point it at a folder")
    folder.mkdir(parents=True, exist_ok=True)
    own = _own_files(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p not in own)
    if foreign:
        raise CacheError(
            f"teacher_cache.path={str(folder)!r} holds files that are not a teacher cache's ({', '.join(foreign[:5])}): "
            "choose an empty or new folder"
        )
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if manifest is not None and manifest.get("fingerprint_digest") == digest:
        return "done"
    shards = _shard_metadata(folder)
    stale = manifest is not None or any(meta.get("fingerprint_digest") != digest for _, meta in shards)
    if stale and not cache.overwrite:
        raise CacheError(
            f"teacher_cache.path={str(folder)!r} holds a cache made from other inputs (teacher, tokenizer, data, "
            "max_seq_len, k or temperature differ): set teacher_cache.overwrite=true to replace it, or choose another "
            "folder"
        )
    keep = {shard_name(index) for index in completed_shards(folder, digest)}
    for path in own:
        if path.name not in keep:
            path.unlink()
    return "write"


def write_shard(folder: Path, index: int, rows: Sequence[dict[str, torch.Tensor]], hashes: Sequence[int], *,
                dtype: str, digest: str, first_item: int) -> int:
    """Write one shard atomically (temporary name, then rename); returns its size in bytes."""
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
    """Write ``manifest.json`` (atomically) once every shard exists; returns it."""
    from safetensors import safe_open

    shards, rows, size, tail_mass = [], 0, 0, 0.0
    for index in range(num_shards(num_items, settings_.samples_per_shard)):
        path = Path(folder) / shard_name(index)
        with safe_open(str(path), framework="pt") as handle:
            shard_rows = int(handle.get_slice("log_tail").get_shape()[0])
            items = int(handle.metadata()["items"])
            tail_mass += float(handle.get_tensor("log_tail").double().exp().sum())
        shards.append({"file": path.name, "first_item": index * settings_.samples_per_shard, "items": items,
                       "rows": shard_rows, "bytes": path.stat().st_size})
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


def remove_cache(folder: Path) -> None:
    """Remove a cache's own files (and the folder when it is then empty)."""
    folder = Path(folder)
    for path in _own_files(folder):
        path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """Read access to a complete cache: each batch's teacher rows by sample id, checked against the batch.

    Args:
        path (Path): the cache folder (its manifest must exist).
        ignore_index (int): label value of tokens without a row.

    Raises:
        CacheError: no complete cache in ``path``.
    """

    def __init__(self, path: Path, ignore_index: int = -100) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(
                f"teacher_cache.path={str(self.path)!r} holds no complete teacher cache (no {MANIFEST}): run "
                "tune run recipes/cache_teacher.py --config <your config> first"
            )
        self.manifest = manifest
        self.k = int(manifest["top_k"])
        self.temperature = float(manifest["temperature"])
        self.samples_per_shard = int(manifest["samples_per_shard"])
        self.num_items = int(manifest["num_items"])
        self.ignore_index = ignore_index
        self._shards = [safe_open(str(self.path / shard["file"]), framework="pt") for shard in manifest["shards"]]
        self._offsets = [handle.get_tensor("offsets") for handle in self._shards]
        self._hashes = [handle.get_tensor("item_hash") for handle in self._shards]

    def item_rows(self, item: int) -> dict[str, torch.Tensor]:
        """The cached rows of one dataset item (read from the memory-mapped shard)."""
        if not 0 <= item < self.num_items:
            raise CacheError(f"sample {item} is not in the teacher cache ({self.num_items} items): the dataset changed; rebuild the cache")
        shard, local = divmod(item, self.samples_per_shard)
        start, end = (int(v) for v in self._offsets[shard][local: local + 2])
        handle = self._shards[shard]
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
            CacheError: an item's tokens or its number of counted tokens differ from the cache's.
        """
        bsz, seq_len = labels.shape
        k = self.k
        ids = torch.arange(k, dtype=torch.int32).expand(bsz, seq_len, k).clone()
        dtype = DTYPES[self.manifest["dtype"]]
        logprobs = torch.zeros(bsz, seq_len, k, dtype=dtype)
        log_tail = torch.zeros(bsz, seq_len, dtype=torch.float32)
        entropy = torch.zeros(bsz, seq_len, dtype=torch.float32)
        keep = (labels != self.ignore_index).cpu()
        cpu_tokens, cpu_real, cpu_labels = tokens.cpu(), real_tokens.cpu(), unshifted_labels.cpu()
        for b, item in enumerate(sample_ids.tolist()):
            shard, local = divmod(item, self.samples_per_shard)
            if not 0 <= item < self.num_items:
                self.item_rows(item)  # raises with the message
            expected = int(self._hashes[shard][local])
            real = cpu_real[b]
            if item_hash(cpu_tokens[b][real], cpu_labels[b][real]) != expected:
                raise CacheError(
                    f"sample {item}'s tokens differ from the ones the teacher cache in {str(self.path)!r} was made from: "
                    "the dataset or its tokenisation changed; rebuild the cache (recipes/cache_teacher.py with "
                    "teacher_cache.overwrite=true)"
                )
            rows = self.item_rows(item)
            positions = keep[b].nonzero().squeeze(1)
            if positions.numel() != rows["ids"].shape[0]:
                raise CacheError(
                    f"sample {item} has {positions.numel()} counted tokens but the teacher cache holds "
                    f"{rows['ids'].shape[0]}: the data or max_seq_len changed; rebuild the cache"
                )
            ids[b, positions] = rows["ids"]
            logprobs[b, positions] = rows["logprobs"]
            log_tail[b, positions] = rows["log_tail"]
            entropy[b, positions] = rows["entropy"]
        device = labels.device
        teacher = kd_losses.TeacherTopK(ids.to(device), logprobs.to(device), log_tail.to(device), self.temperature)
        return teacher, entropy.to(device)


def check_cache(
    cfg: Mapping[str, Any], dataset: Any, *, temperature: float, ignore_index: int, vocab_size: int,
    config_hint: str = "<your config>",
) -> tuple[list[str], list[str]]:
    """Problems and notices of a training run's ``teacher_cache`` against its config (nothing heavy is loaded).

    Returns:
        tuple[list[str], list[str]]: problems (missing, incomplete or stale cache) and notices.
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
    current, _ = fingerprint(
        cfg, dataset, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size, top_k=cache.top_k,
        stamps=manifest.get("file_stamps"), hash_teacher=present,
    )
    problems = mismatches(manifest["fingerprint"], current, path=cache.path, config_hint=config_hint)
    missing = [s["file"] for s in manifest.get("shards", []) if not (cache.path / s["file"]).is_file()]
    if missing:
        problems.append(f"teacher_cache.path={str(cache.path)!r} lacks {', '.join(missing[:3])}: rebuild the cache")
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
