"""Read back the metrics a run logged, by name.

One parser serves the whole project (``kd_eval.parse_disk_log`` / ``kd_eval.read_run_logs``: torchtune's
``DiskLogger`` format, ``Step <n> | name:value ...``, several launches of a resumed run merged); this module is the
short name the tests and scripts use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from kd_eval import parse_disk_log, read_run_logs

Metrics = dict[str, list[tuple[int, float]]]

__all__ = ["parse_disk_log", "read_run_logs", "read_disk_log"]


def read_disk_log(path: Union[str, Path]) -> Metrics:
    """``{metric: [(step, value), ...]}`` of a run: a ``log_*.txt`` file, a ``logs/`` folder or a run folder."""
    return read_run_logs(path)[1]
