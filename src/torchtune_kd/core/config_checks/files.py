"""Looking at input files without loading them: whole safetensors, blank files, what a file actually holds.

Each helper reads at most a header or a few kilobytes, so the pre-flight can name a truncated checkpoint or a
tokenizer path that points at the wrong kind of file before any weights load.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional

# The safetensors format caps its JSON header at 100 MB; a larger length is corruption, not a big model.
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def is_local(value: str) -> bool:
    """A plain local path (not a URL or a glob, which ``datasets`` resolves itself)."""
    return "://" not in value and not any(ch in value for ch in "*?[")


def is_blank(path: Path) -> bool:
    """Empty or only whitespace (read only when small: a real data file is never a few bytes of spaces)."""
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete safetensors file, from its header alone (no weights are read).

    The format is an 8-byte little-endian header length, a JSON header whose tensors' ``data_offsets`` index the
    data that follows, and nothing after the last tensor: so the file size must be 8 + header length + the largest
    offset.

    Raises:
        OSError: the file cannot be read.
    """
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for the safetensors header length"
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8 or length > SAFETENSORS_MAX_HEADER:
            return f"its header length {length} exceeds the file ({size} bytes)"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return "its header is not valid JSON"
    try:
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        return "its header has a tensor without valid data_offsets"
    expected = 8 + length + end
    if size != expected:
        return f"{size} bytes, but its header describes {expected}"
    return None


def describe_file(path: Path) -> tuple[str, str]:
    """(kind, description) of a file from its first bytes: what a tokenizer path actually points at.

    Raises:
        OSError: the file cannot be read.
    """
    if path.is_dir():
        return "folder", "a folder"
    size = path.stat().st_size
    if size == 0:
        return "empty", "an empty file"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors", "a safetensors weights file"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json", "a JSON file"
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return "tiktoken", "a tiktoken BPE file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", "a binary file"
    return "text", "a text file"


def json_problem(path: Path) -> Optional[str]:
    """Where a JSON (or JSON Lines) data file stops parsing, ``"it is empty"``, or ``None`` when it parses.

    Meant for after a dataset failed to build: ``datasets`` says just "An error occurred while generating the
    dataset". A file that cannot be read gives ``None`` (the builder's own error is then the best explanation).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text: byte {err.start}"
    except OSError:
        return None
    if not text.strip():
        return "it is empty"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        whole = err
    else:
        # `datasets` reads `[]` as zero rows and says only 'Instruction "train" corresponds to no data!'.
        return "it is empty" if document == [] or document == {} else None
    if text.lstrip().startswith("["):
        return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    # Not one JSON document: JSON Lines, one record per line.
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: {err.msg}"
    return None
