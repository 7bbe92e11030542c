"""Read back the metrics a run logged: torchtune ``DiskLogger`` files, by metric name.

One parser serves the whole project. DiskLogger writes ``Step <n> | name:value ...`` lines; :func:`parse_disk_log`
reads one file into ``{metric: [(step, value), ...]}``, :func:`read_run_logs` merges every launch of a (resumed)
run and names it after its output folder, and :func:`read_disk_log` is the short form the tests and scripts use when
the name is not needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

Metrics = dict[str, list[tuple[int, float]]]

__all__ = ["Metrics", "parse_disk_log", "read_run_logs", "read_disk_log"]

_LOG_LINE_RE = re.compile(r"^Step\s+(\d+)\s*\|\s*(.*)$")
_TENSOR_RE = re.compile(r"^tensor\((.*?)(?:,.*)?\)$")


def _parse_value(text: str) -> Optional[float]:
    match = _TENSOR_RE.match(text)  # a metric logged as a 0-d tensor prints as tensor(1.23[, device=...])
    try:
        return float(match.group(1) if match else text)
    except ValueError:
        return None


def parse_disk_log(path: Union[str, Path]) -> Metrics:
    """Parse a torchtune ``DiskLogger`` file into ``{metric: [(step, value), ...]}``.

    DiskLogger writes ``Step N | name:value name:value `` per ``log_dict`` call and ``Step N | name:value`` per
    ``log`` call. Names may contain ``/`` (``weight/ce``, ``ir_loss/0-1``); the value is what follows the *last*
    ``:`` of a token. Non-numeric values and unrelated lines are skipped. A step logged twice (e.g. after a resume
    into the same file) keeps its last value; each series is sorted by step.

    Args:
        path (str | Path): the ``log_*.txt`` file.

    Returns:
        Metrics: metric -> (step, value) pairs in step order.

    Raises:
        ValueError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"log file {str(path)!r} does not exist.")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LOG_LINE_RE.match(line.strip())
        if not match:
            continue
        step = int(match.group(1))
        for token in match.group(2).split():
            name, sep, raw = token.rpartition(":")
            value = _parse_value(raw) if sep and name else None
            if value is not None:
                series.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in series.items()}


def read_run_logs(path: Union[str, Path]) -> tuple[str, Metrics]:
    """Read a run's metrics from a log file, a ``logs/`` folder or a run's output folder.

    All ``log_*.txt`` files of a folder (one per launch, e.g. after resuming) are merged in file-name order
    (DiskLogger names them by Unix time), later files winning for repeated steps.

    Args:
        path (str | Path): ``.../run/logs/log_123.txt``, ``.../run/logs`` or ``.../run``.

    Returns:
        tuple[str, Metrics]: the run's label (its output folder name) and its metrics.

    Raises:
        ValueError: the path does not exist or holds no log files.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
        run_dir = path.parent.parent if path.parent.name == "logs" else path.parent
    elif path.is_dir():
        logs = path / "logs" if (path / "logs").is_dir() else path
        files = sorted(logs.glob("log_*.txt"))
        run_dir = logs.parent if logs.name == "logs" else logs
        if not files:
            raise ValueError(f"{str(path)!r} holds no log_*.txt files (looked in {str(logs)!r}).")
    else:
        raise ValueError(f"run log {str(path)!r} does not exist.")
    merged: dict[str, dict[int, float]] = {}
    for file in files:
        for name, points in parse_disk_log(file).items():
            merged.setdefault(name, {}).update(points)
    return run_dir.name, {name: sorted(points.items()) for name, points in merged.items()}



def read_disk_log(path: Union[str, Path]) -> Metrics:
    """``{metric: [(step, value), ...]}`` of a run: a ``log_*.txt`` file, a ``logs/`` folder or a run folder.

    Args:
        path (str | Path): as for :func:`read_run_logs`.

    Returns:
        Metrics: metric -> (step, value) pairs in step order, all launches merged.

    Raises:
        ValueError: the path does not exist or holds no log files.
    """
    return read_run_logs(path)[1]
