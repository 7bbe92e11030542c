"""Install hook: make ``tune run recipes/<recipe>.py`` find a checkout's ``recipes`` package.

torchtune 0.6.1 runs a recipe given by path as the module ``recipes.<name>`` after appending the working directory
to the end of ``sys.path``; its own wheel installs a top-level ``recipes`` package (whose ``__init__`` just raises
"The torchtune recipes directory isn't a package") that therefore always wins. :func:`activate` puts the checkout's
root at the front of ``sys.path`` so ``recipes`` resolves to the project's folder.

``python -m torchtune_kd.recipes_path [ROOT]`` (run by ``make setup`` from the checkout; ROOT defaults to the current
folder) writes a one-line ``.pth`` file into the environment's site-packages that calls :func:`activate` with that
root at interpreter start-up. The root is written into the hook explicitly: this module never guesses where a
checkout is from its own location, so an installed wheel is unaffected.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Union

PTH_NAME = "torchtune_kd_recipes.pth"


def activate(root: Union[str, Path]) -> bool:
    """Put ``root`` first on ``sys.path`` if it is a checkout with a ``recipes`` package; True if it did."""
    root = Path(root)
    if not (root / "recipes" / "__init__.py").is_file():
        return False
    text = str(root)
    if not sys.path or sys.path[0] != text:
        sys.path.insert(0, text)
    # A failed earlier import of torchtune's `recipes` must not stick.
    module = sys.modules.get("recipes")
    if module is not None and not str(getattr(module, "__file__", "")).startswith(text):
        del sys.modules["recipes"]
    return True


def install(root: Union[str, Path]) -> Path:
    """Write the ``.pth`` hook for the checkout at ``root`` into this interpreter's site-packages."""
    root = Path(root).resolve()
    if not (root / "recipes" / "__init__.py").is_file():
        raise SystemExit(f"{root} is not a torchtune-kd checkout (no recipes/__init__.py): run this from the checkout")
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(f"import torchtune_kd.recipes_path as _kd; _kd.activate({str(root)!r})\n")
    return target


if __name__ == "__main__":
    print(f"wrote {install(sys.argv[1] if len(sys.argv) > 1 else Path.cwd())}")
