"""Output folders that never cost a user a file: every command that writes claims its folder through here.

The rule (the same for the recipes, the teacher-cache pre-pass and every script that takes an output folder):

- a command writes only into a folder that is new, empty, or its own; its own means the folder holds the marker
  file :data:`MARKER` that the same command wrote, listing every top-level entry it wrote there;
- it never deletes or replaces an entry the marker does not list, whatever its name: nothing is judged "ours" by
  matching a file name;
- a folder holding anything else is refused before any heavy work, with the fix (another folder, or the command's
  overwrite flag, which adopts the folder for the new entries and still never touches the files already there).

Entries are claimed (recorded in the marker) *before* they are written, so an interrupted write is still
recognised as this command's on the next run. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from torchtune_kd.errors import OutputFolderError  # noqa: F401  (raised here; re-exported for callers)

PathLike = Union[str, os.PathLike]
MARKER = ".torchtune_kd_outputs.json"
MARKER_FORMAT = 1
# Temporaries derived from an owned entry's name (atomic writes stage beside the final name); being derived from a
# claimed name is what makes them ours, never the pattern alone.
TEMPORARY_SUFFIXES = (".tmp", ".old", ".staging")


@dataclass
class FolderReport:
    """What a folder holds, as this module sees it (reading only)."""

    path: Path
    exists: bool
    is_dir: bool
    owner: Optional[str] = None  # the command named in a valid marker
    written: list[str] = field(default_factory=list)  # entries the marker lists
    foreign: list[str] = field(default_factory=list)  # entries the marker does not list (all of them without one)
    bad_marker: Optional[str] = None  # why a marker file present could not be read


def _read_marker(path: Path) -> tuple[Optional[dict], Optional[str]]:
    marker = path / MARKER
    if not marker.exists():
        return None, None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{MARKER} cannot be read ({type(err).__name__})"
    if (
        not isinstance(data, dict)
        or data.get("format") != MARKER_FORMAT
        or not isinstance(data.get("owner"), str)
        or not isinstance(data.get("written"), list)
        or not all(isinstance(name, str) and _is_plain_name(name) for name in data["written"])
    ):
        return None, f"{MARKER} is not one this project wrote"
    return data, None


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..", MARKER) and "/" not in name and os.sep not in name


def _derived_owner(name: str, written: Iterable[str]) -> bool:
    """``name`` is a temporary of an owned entry (``.<entry><suffix>``)."""
    for entry in written:
        if any(name == f".{entry}{suffix}" for suffix in TEMPORARY_SUFFIXES):
            return True
    return False


def inspect(path: PathLike) -> FolderReport:
    """Read what ``path`` holds: its owner (from the marker), the entries it wrote and the foreign ones."""
    path = Path(path)
    if not path.exists():
        return FolderReport(path, exists=False, is_dir=False)
    if not path.is_dir():
        return FolderReport(path, exists=True, is_dir=False)
    data, bad = _read_marker(path)
    written = list(dict.fromkeys(data["written"])) if data else []
    entries = sorted(entry.name for entry in path.iterdir() if entry.name != MARKER or bad)
    foreign = [name for name in entries if name not in written and not _derived_owner(name, written)]
    return FolderReport(path, True, True, owner=data["owner"] if data else None, written=written, foreign=foreign,
                        bad_marker=bad)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check(
    path: PathLike,
    *,
    owner: str,
    option: str,
    overwrite: bool = False,
    overwrite_hint: Optional[str] = None,
) -> list[str]:
    """Problems with writing ``owner``'s outputs into ``path`` (empty list: it may), without writing anything.

    Args:
        path (PathLike): the output folder.
        owner (str): the command that writes (e.g. ``"scripts/prune.py"``); a folder another command owns is refused.
        option (str): how the user named the folder (``"--out"``, ``"output_dir"``), quoted in the messages.
        overwrite (bool): the user allowed writing beside files already in a folder this command does not own (they
            are still never touched).
        overwrite_hint (Optional[str]): how to give ``overwrite`` (e.g. ``"--overwrite"``); ``None``: the command has
            no such flag.
    """
    report = inspect(path)
    shown = f"{option}={str(path)!r}"
    if report.exists and not report.is_dir:
        return [f"{shown} is a file, not a folder: give a folder (new or empty) for the outputs"]
    if not report.exists:
        return []
    if report.bad_marker:
        return [f"{shown} holds {report.bad_marker}: it was not written by {owner}; give a new or empty folder"]
    if report.owner is not None and report.owner != owner:
        return [
            f"{shown} holds the outputs of {report.owner}, not of {owner}: give a new or empty folder (never the "
            "folder of another command)"
        ]
    if report.owner is None and report.foreign and not overwrite:
        fix = "give a new or empty folder"
        if overwrite_hint:
            fix += f", or pass {overwrite_hint} to write beside them (files already there are never touched)"
        return [f"{shown} holds files {owner} did not write ({_listing(report.foreign)}): {fix}"]
    return []


class OwnedFolder:
    """A folder claimed by one command: it may create, replace and delete the entries its marker lists, only those.

    Use :func:`claim_output_folder` to get one.
    """

    def __init__(self, path: Path, owner: str, written: list[str]) -> None:
        self.path = path
        self.owner = owner
        self._written = list(written)

    @property
    def written(self) -> list[str]:
        """Top-level entries this command wrote (or claimed) here, in claim order."""
        return list(self._written)

    def owns(self, name: str) -> bool:
        return name in self._written

    def _save_marker(self) -> None:
        marker = self.path / MARKER
        tmp = self.path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({"format": MARKER_FORMAT, "owner": self.owner, "written": self._written}, indent=1)
                       + "\n", encoding="utf-8")
        os.replace(tmp, marker)

    def claim(self, *names: str) -> list[Path]:
        """Record top-level entries this command is about to write; return their paths.

        Raises:
            OutputFolderError: an entry of that name exists and this command did not write it.
            ValueError: a name that is not a single plain path component (a programming error).
        """
        new = []
        for name in names:
            if not _is_plain_name(name):
                raise ValueError(f"{name!r} is not a plain top-level entry name")
            if name in self._written or name in new:
                continue
            if os.path.lexists(self.path / name):
                raise OutputFolderError(
                    f"{str(self.path / name)!r} exists and {self.owner} did not write it: it is never replaced; move it "
                    "or give a new or empty output folder"
                )
            new.append(name)
        if new:
            self._written.extend(new)
            self._save_marker()
        return [self.path / name for name in names]

    def path_of(self, name: str) -> Path:
        """Claim one entry and return its path."""
        return self.claim(name)[0]

    def remove(self, name: str) -> bool:
        """Delete an entry this command wrote; never anything else. Returns whether it existed.

        Its temporaries stay: a replacement being staged beside it (``.<name>.staging``) is about to take its place.
        """
        if name not in self._written:
            raise OutputFolderError(f"{str(self.path / name)!r} was not written by {self.owner}: it is never deleted")
        return _delete(self.path / name)

    def remove_all(self, keep: Iterable[str] = ()) -> list[Path]:
        """Delete every entry this command wrote here (but ``keep``), e.g. before a rerun that starts afresh."""
        kept = set(keep)
        self.remove_temporaries()
        removed = []
        for name in list(self._written):
            if name in kept:
                continue
            if self.remove(name):
                removed.append(self.path / name)
            self._written.remove(name)
        self._save_marker()
        return removed

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporaries (``.<entry>.tmp`` / ``.old`` / ``.staging``) an interrupted write of an owned entry
        left; a file that merely looks like one is never touched."""
        targets = [self.path / f".{name}{suffix}" for name in self._written for suffix in TEMPORARY_SUFFIXES]
        return [target for target in targets if _delete(target)]


def _delete(target: Path) -> bool:
    """Delete a file, a folder or a link (never what a link points to); whether there was one."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
        return True
    if os.path.lexists(target):
        target.unlink()
        return True
    return False


def claim_output_folder(
    path: PathLike,
    *,
    owner: str,
    option: str,
    overwrite: bool = False,
    overwrite_hint: Optional[str] = None,
) -> OwnedFolder:
    """Make ``path`` ``owner``'s output folder (creating it), or refuse with the fix; see :func:`check`.

    A new or empty folder, or one this command owns already, is claimed as it is (the entries it wrote before stay
    listed: :meth:`OwnedFolder.remove_all` starts afresh). With ``overwrite``, a folder holding other files is adopted:
    they are left as they are and can never be claimed.

    Raises:
        OutputFolderError: the folder is a file, another command's, or holds files this one did not write (without
            ``overwrite``).
    """
    problems = check(path, owner=owner, option=option, overwrite=overwrite, overwrite_hint=overwrite_hint)
    if problems:
        raise OutputFolderError(problems[0])
    path = Path(path)
    report = inspect(path)
    path.mkdir(parents=True, exist_ok=True)
    folder = OwnedFolder(path, owner, report.written if report.owner == owner else [])
    folder._save_marker()
    return folder


def claim_or_exit(path: PathLike, **kwargs) -> OwnedFolder:
    """:func:`claim_output_folder` for a command-line script: a refusal ends the process with ``error: <message>``."""
    try:
        return claim_output_folder(path, **kwargs)
    except OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None
