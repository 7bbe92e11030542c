"""Atomic writes: a crash or a failed write (permissions, a full disk) leaves the old version or the new one, never
half of one.

Every file and folder is written under a temporary name beside its final one and moved into place with
``os.replace``; the temporaries have names of their own (``.<name>.tmp``, ``.<name>.staging``, ``.<name>.old``), so the
next save can remove what an interrupted one left (:func:`clean_leftovers`) without touching anything else.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

# Names of this module's own temporaries (see atomic_torch_save, replace_dir, stage_dir).
_LEFTOVER = re.compile(r"^\.(.+\.(old|tmp)|.+\.staging|staging_.+)$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_dir(final: Path) -> Path:
    """A fresh, empty staging folder beside ``final`` (its name marks it as this module's temporary)."""
    staged = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one of the same name.

    Between the two renames the old folder is ``.<name>.old``: if the second rename fails (a permission or disk
    error), the old folder is moved back before the error goes on; if the process dies there, the next save removes
    the leftover.
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        try:
            os.replace(staged, final)
        except OSError:
            os.replace(trash, final)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


def clean_leftovers(*folders: Path) -> list[Path]:
    """Remove the temporaries an interrupted save left in ``folders``, by this module's temporary names: only for
    folders that are the recipes' own (``training_state/``, ``adapters/``); at the top of ``output_dir`` only
    :meth:`~torchtune_kd.output_folder.OwnedFolder.remove_temporaries` may delete (the temporaries of owned entries).

    Returns:
        list[Path]: what was removed.
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _LEFTOVER.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
