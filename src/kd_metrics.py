"""Read back the metrics a run logged, by name (torchtune's ``DiskLogger`` format).

A DiskLogger line is ``Step <n> | name:value name:value ...``; metric names contain no spaces or colons, values are
numbers (tensors are written as ``tensor(x)`` by torchtune; those are parsed too).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

_STEP = re.compile(r"^Step (\d+) \| (.*)$")
_TENSOR = re.compile(r"^tensor\((.*?)(?:,.*)?\)$")

Metrics = dict[str, list[tuple[int, float]]]


def parse_disk_log(text: str) -> Metrics:
    """Parse DiskLogger text into ``{metric: [(step, value), ...]}`` in file order."""
    metrics: Metrics = {}
    for line in text.splitlines():
        match = _STEP.match(line.strip())
        if not match:
            continue
        step = int(match.group(1))
        for item in match.group(2).split():
            name, sep, raw = item.rpartition(":")
            if not sep or not name:
                continue
            tensor = _TENSOR.match(raw)
            try:
                value = float(tensor.group(1) if tensor else raw)
            except ValueError:
                continue
            metrics.setdefault(name, []).append((step, value))
    return metrics


def find_disk_log(path: Union[str, Path]) -> Path:
    """The newest ``log_*.txt`` in a run's log folder (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = sorted(path.glob("**/log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no DiskLogger file (log_*.txt) under {path}")
    return candidates[-1]


def read_disk_log(path: Union[str, Path]) -> Metrics:
    """Metrics of a run: ``path`` is a DiskLogger file or a folder containing one (the newest is used)."""
    return parse_disk_log(find_disk_log(path).read_text())
