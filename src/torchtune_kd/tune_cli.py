"""Running a recipe the way users do: ``tune run <recipe> --config <yaml> [key=value ...]`` in a subprocess.

One helper for the scripts (demo, experiment) and the tests, so that every run they make is a command line a user
could type. The interpreter is the current one (``python -m torchtune._cli.tune``), so the run sees the same
environment without relying on a ``tune`` executable on ``PATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]


def tune_run_command(
    recipe: PathLike, config: PathLike, overrides: Sequence[str] = (), *, nproc_per_node: Optional[int] = None
) -> list[str]:
    """The argument list of ``tune run [--nproc_per_node N] RECIPE --config CONFIG OVERRIDES...``."""
    launcher = ["--nproc_per_node", str(nproc_per_node)] if nproc_per_node else []
    return [sys.executable, "-m", "torchtune._cli.tune", "run", *launcher, str(recipe), "--config", str(config), *overrides]


def tune_run(
    recipe: PathLike,
    config: PathLike,
    overrides: Sequence[str] = (),
    *,
    cwd: PathLike,
    env: Optional[Mapping[str, str]] = None,
    stdout: Union[int, IO, None] = subprocess.PIPE,
    timeout: Optional[float] = None,
    nproc_per_node: Optional[int] = None,
) -> subprocess.CompletedProcess:
    """Run a recipe to completion and return the finished process (text output; stderr merged into stdout).

    Args:
        recipe (PathLike): a recipe file (relative to ``cwd``) or a torchtune recipe name.
        config (PathLike): the YAML config.
        overrides (Sequence[str]): ``key=value`` / ``~key`` command-line overrides.
        cwd (PathLike): working directory (a relative recipe path resolves against it).
        env (Optional[Mapping[str, str]]): variables added to this process's environment.
        stdout: where the output goes: captured (default), a file, or ``None`` (this terminal).
        timeout (Optional[float]): seconds before the run is killed.
        nproc_per_node (Optional[int]): processes per node (torchrun), for distributed recipes.
    """
    return subprocess.run(
        tune_run_command(recipe, config, overrides, nproc_per_node=nproc_per_node),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def start_tune_run(
    recipe: PathLike,
    config: PathLike,
    overrides: Sequence[str] = (),
    *,
    cwd: PathLike,
    env: Optional[Mapping[str, str]] = None,
    nproc_per_node: Optional[int] = None,
) -> subprocess.Popen:
    """Start a recipe without waiting (output piped, text, stderr merged): for progress display or signals."""
    return subprocess.Popen(
        tune_run_command(recipe, config, overrides, nproc_per_node=nproc_per_node),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
