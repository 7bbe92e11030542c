"""Which checkout is running: warn when the imported package is not the one of the checkout being used.

Two checkouts sharing one virtualenv (``pip install -e`` and the ``recipes`` start-up hook point at the first) would
silently run the first checkout's code from the second one's folder: its recipes, losses and fixes. The check costs
a few ``stat`` calls at import time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

ENV_SILENCE = "TORCHTUNE_KD_ALLOW_OTHER_CHECKOUT"


def checkout_root(start: Path) -> Optional[Path]:
    """The torchtune-kd checkout holding ``start`` (a folder with ``src/torchtune_kd`` and ``recipes/``), if any."""
    try:
        start = start.resolve()
    except OSError:
        return None
    for folder in (start, *start.parents):
        if (folder / "src" / "torchtune_kd" / "__init__.py").is_file() and (folder / "recipes" / "__init__.py").is_file():
            return folder
    return None


def foreign_checkouts(package_file: Path, places: Sequence[Path]) -> list[Path]:
    """The checkouts among ``places`` (the working folder, the script run) that the package at ``package_file`` is
    not part of: their own code is not what runs."""
    package_root = checkout_root(Path(package_file).parent)
    found = []
    for place in places:
        root = checkout_root(place)
        if root is not None and root != package_root and root not in found:
            found.append(root)
    return found


def warn_if_other_checkout(package_file: str) -> list[Path]:
    """Print one warning on stderr when the working folder or the script being run belongs to another checkout."""
    if os.environ.get(ENV_SILENCE):
        return []
    places = [Path.cwd()]
    if sys.argv and sys.argv[0] not in ("", "-c", "-m"):
        places.append(Path(sys.argv[0]).parent)
    others = foreign_checkouts(Path(package_file), places)
    for other in others:
        print(
            f"warning: this is the torchtune-kd checkout {str(other)!r}, but the torchtune_kd package being run is "
            f"{str(Path(package_file).parent)!r}: the other checkout's code runs, not this one's. Give this checkout "
            f"its own virtualenv (`make setup` here), or set {ENV_SILENCE}=1 if that is intended.",
            file=sys.stderr,
        )
    return others
