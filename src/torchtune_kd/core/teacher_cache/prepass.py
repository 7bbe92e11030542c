"""The pre-pass's side of a cache (``recipes/cache_teacher.py``): its output folder, resumable shard by shard, and the
atomic writes of shards and manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from torchtune_kd import output_folder
from torchtune_kd.core.teacher_cache.fingerprinting import fingerprint_digest
from torchtune_kd.core.teacher_cache.section import DTYPES, CacheSettings
from torchtune_kd.core.teacher_cache.shards import (
    FORMAT_VERSION,
    MANIFEST,
    read_header,
    structure_defect,
    manifest_shard_problem,
    num_shards,
    read_manifest,
    shard_defect,
    shard_name,
    shard_sha256,
)
from torchtune_kd.errors import CacheError

# The pre-pass's name in its output folder's marker (torchtune_kd.output_folder).
OWNER = "recipes/cache_teacher.py"


def _shard_state(path: Path, index: int, cache: CacheSettings, digest: str, num_items: int) -> str:
    """``absent``, ``current`` (a whole shard of this cache, settings included), ``other`` (a whole shard of another
    cache, or of this one with another dtype or samples_per_shard) or ``damaged``."""
    if not path.is_file():
        return "absent"
    header, length, size, defect = read_header(path)
    if defect or structure_defect(header, length, size):
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


def iter_shard_batches(first: int, end: int, batch_size: int) -> Iterable[list[int]]:
    """Item indices of one shard in batches that never cross the shard's end (so a rerun reproduces it)."""
    for start in range(first, end, batch_size):
        yield list(range(start, min(start + batch_size, end)))
