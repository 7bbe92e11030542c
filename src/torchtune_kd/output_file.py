"""Single output files (a table, a plot, a JSON report) that never replace a user's file by accident.

The file counterpart of :mod:`torchtune_kd.output_folder`, for options that name one file (``--out table.md``,
``--json bench.json``): the file the user named is written only when it does not exist yet, or when the user
passed the command's overwrite flag (naming one file and asking to replace it is asking for exactly that
replacement). Nothing else is ever touched. The file is staged beside its final name and moved into place in one
step, so an interrupted write never leaves a half-written file under the name the user gave; without the
overwrite flag the move itself refuses a file that appeared meanwhile. This module imports nothing from the rest of
the package.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from torchtune_kd.errors import OutputFileError  # noqa: F401  (raised here; re-exported for callers)

PathLike = Union[str, os.PathLike]


def check(path: PathLike, *, option: str, overwrite: bool = False, overwrite_hint: Optional[str] = "--overwrite") -> list[str]:
    """Problems with writing the output file ``path`` (empty list: it may be written), without writing anything.

    Args:
        path (PathLike): the file the user named.
        option (str): how the user named it (``"--out"``), quoted in the messages.
        overwrite (bool): the user asked for an existing file to be replaced.
        overwrite_hint (Optional[str]): how to give ``overwrite`` (``None``: the command has no such flag).
    """
    path = Path(path)
    shown = f"{option}={str(path)!r}"
    if path.is_dir():
        return [f"{shown} is a folder: give the path of the file to write"]
    if os.path.lexists(path) and not overwrite:
        fix = "give another file name"
        if overwrite_hint:
            fix += f", or pass {overwrite_hint} to replace it"
        return [f"{shown} exists and is never replaced unasked: {fix}"]
    if path.parent.exists() and not path.parent.is_dir():
        return [f"{shown}: {str(path.parent)!r} is a file, not a folder: give a path inside a folder"]
    return []


def check_or_exit(path: PathLike, **kwargs) -> None:
    """:func:`check` for a command-line script: a problem ends the process with ``error: <message>``."""
    problems = check(path, **kwargs)
    if problems:
        raise SystemExit(f"error: {problems[0]}")


@contextlib.contextmanager
def staged(
    path: PathLike, *, option: str, overwrite: bool = False, overwrite_hint: Optional[str] = "--overwrite"
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it becomes ``path`` in one step.

    The temporary has a fresh unique name (never one that exists) and keeps ``path``'s suffix, so writers that pick
    the format from it (matplotlib's ``savefig``) behave as with the final name. On an error it is deleted and
    ``path`` is left as it was.

    Raises:
        OutputFileError: ``path`` is a folder, or exists (or appeared meanwhile) and ``overwrite`` is false.
    """
    path = Path(path)
    problems = check(path, option=option, overwrite=overwrite, overwrite_hint=overwrite_hint)
    if problems:
        raise OutputFileError(problems[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    tmp = Path(name)
    try:
        # mkstemp makes the file owner-only; the output gets the permissions a plain open() would give it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        _publish(tmp, path, option=option, overwrite=overwrite, overwrite_hint=overwrite_hint)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _publish(tmp: Path, path: Path, *, option: str, overwrite: bool, overwrite_hint: Optional[str]) -> None:
    if overwrite:
        if path.is_dir():
            raise OutputFileError(check(path, option=option, overwrite=True)[0])
        os.replace(tmp, path)
        return
    # A hard link creates the name only if it is free (atomically); the temporary is then dropped.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputFileError(check(path, option=option, overwrite=False, overwrite_hint=overwrite_hint)[0]) from None
    except OSError:
        # A file system without hard links: the check and the move are two steps here.
        if os.path.lexists(path):
            raise OutputFileError(check(path, option=option, overwrite=False, overwrite_hint=overwrite_hint)[0]) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write(
    path: PathLike,
    content: Union[str, bytes],
    *,
    option: str,
    overwrite: bool = False,
    overwrite_hint: Optional[str] = "--overwrite",
) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` through :func:`staged`; returns ``path``.

    Raises:
        OutputFileError: see :func:`staged`.
    """
    with staged(path, option=option, overwrite=overwrite, overwrite_hint=overwrite_hint) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)
