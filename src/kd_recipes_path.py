"""Make ``tune run recipes/<recipe>.py`` find this project's ``recipes`` package.

torchtune 0.6.1 runs a recipe given by path as the module ``recipes.<name>`` after appending the working directory
to the end of ``sys.path``; its own wheel installs a top-level ``recipes`` package (whose ``__init__`` just raises
"The torchtune recipes directory isn't a package") that therefore always wins. Importing this module puts the
repository root at the front of ``sys.path`` so ``recipes`` resolves to the project's folder.

``python -m kd_recipes_path`` writes a one-line ``.pth`` file into the environment's site-packages that imports this
module at interpreter start-up (``make setup`` does it). Only a repository checkout (editable install) is affected:
nothing happens unless ``<root>/recipes/__init__.py`` exists next to ``src/``.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "torchtune_kd_recipes.pth"


def activate() -> bool:
    """Put the repository root first on ``sys.path`` if this is a checkout with a ``recipes`` package."""
    if not (REPO_ROOT / "recipes" / "__init__.py").is_file():
        return False
    root = str(REPO_ROOT)
    if not sys.path or sys.path[0] != root:
        sys.path.insert(0, root)
    # A failed earlier import of torchtune's `recipes` must not stick.
    module = sys.modules.get("recipes")
    if module is not None and not str(getattr(module, "__file__", "")).startswith(root):
        del sys.modules["recipes"]
    return True


def install() -> Path:
    """Write the ``.pth`` hook into this interpreter's site-packages and return its path."""
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import kd_recipes_path; kd_recipes_path.activate()\n")
    return target


if __name__ == "__main__":
    print(f"wrote {install()}")
