"""A complete cache's files and their integrity: the manifest, each shard's name, header, size and SHA-256.

Nothing here loads a shard's data or unpickles anything: a shard's safetensors header and size are checked against
the manifest (milliseconds per shard), its SHA-256 on request (:func:`shard_defect`); a pickle or a zip put in a
shard's place is recognised and named.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

from torchtune_kd.core.teacher_cache.fingerprinting import file_sha256, rebuild_hint
from torchtune_kd.errors import CacheError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "shard_"
SHARD_SUFFIX = ".safetensors"
# The safetensors dtype names of what a shard stores.
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# A shard's header is a few hundred bytes; anything far larger is not one (a pickle's first 8 bytes read as a length
# are typically astronomically large).
_MAX_HEADER = 1 << 20


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def num_shards(num_items: int, samples_per_shard: int) -> int:
    return max(1, math.ceil(num_items / samples_per_shard))


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


def read_header(path: Path) -> tuple[Optional[dict[str, Any]], int, int, Optional[str]]:
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


def structure_defect(header: dict[str, Any], length: int, size: int) -> Optional[str]:
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
    header, length, size, defect = read_header(path)
    if defect:
        return defect
    if entry is not None and entry.get("bytes") is not None and size != int(entry["bytes"]):
        return f"it is {size} bytes but the manifest records {entry['bytes']} (truncated, or replaced by another file)"
    defect = structure_defect(header, length, size)
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
