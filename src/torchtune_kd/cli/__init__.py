"""The commands behind ``scripts/``: one module per script, holding its argument parser and ``main(argv)``.

Each ``scripts/<name>.py`` only calls ``torchtune_kd.cli.<name>.main()``; the product logic the commands use lives in
the package modules (``pruning``, ``experiment``, ``evaluation``, ...), so tests call the same functions the scripts
do. A module's docstring is its ``--help`` text.

The package itself imports nothing heavy. The commands import torchtune, the models and lm-eval inside the functions
that need them, so ``--help`` and the argument checks come first (and ``evaluate`` sets the hub-access variables
before lm-eval is imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torchtune_kd.checkout import checkout_root


def checkout_dir() -> Path:
    """The torchtune-kd checkout whose ``recipes`` package ``tune run recipes/<name>.py`` imports.

    The commands start recipes with this folder as the working directory and take their default paths
    (``configs/``, ``outputs/``, ``cache/``) from it. It is the folder the install hook
    (:mod:`torchtune_kd.recipes_path`, written by ``make setup``) puts first on ``sys.path``, so a recipe a command
    starts is always this checkout's own; the package never infers a checkout from where its own files lie.

    Returns:
        Path: the checkout's root (it holds ``recipes/`` and ``src/torchtune_kd/``).

    Raises:
        SystemExit: no checkout's ``recipes`` package is importable (the hook is missing), with the fix.
    """
    spec = importlib.util.find_spec("recipes")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location).resolve().parent
        if checkout_root(folder) == folder:
            return folder
    raise SystemExit(
        "error: the `recipes` package this interpreter imports is not a torchtune-kd checkout's (found: "
        f"{spec.origin if spec is not None else 'none'}): run `make setup` in the checkout (it installs the hook "
        "torchtune_kd.recipes_path), or `python -m torchtune_kd.recipes_path` from the checkout's root"
    )
