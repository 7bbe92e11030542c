"""Where the single-device recipe spends a run's training time, by function (cProfile, cumulative).

Runs ``train()`` of ``recipes/knowledge_distillation_single_device.py`` in-process on a config (e.g. one that
``scripts/bench_recipe.py`` wrote) and prints the recipe's, the training core's, the losses' and torchtune's
transformer calls with their cumulative time::

    python scripts/profile_recipe.py cache/bench_recipe/ours_fkl_v32000.yaml --steps 6

The run goes to ``--output-dir``/run; ``--output-dir`` must be new, empty, or a folder this script wrote (its marker
file ``.torchtune_kd_outputs.json``), whose earlier run is replaced. Anything else is refused before the recipe
starts, and a file this script did not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd.cli import checkout_dir

OWNER = "scripts/profile_recipe.py"
SHOWN = ("kd_losses", "torchtune_kd", "single_device", "modules/transformer", "cross_entropy", "function calls", "cumtime")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the recipe under cProfile and print the lines of the project's and torchtune's calls; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output-dir", type=Path, default=checkout_dir() / "cache" / "profile_recipe",
                        help="new, empty, or this script's own folder; the run goes to its run/ (default: %(default)s)")
    parser.add_argument("--lines", type=int, default=45, help="functions read from the top of the profile")
    args = parser.parse_args(argv)

    from torchtune_kd import output_folder

    folder = output_folder.claim_or_exit(args.output_dir, owner=OWNER, option="--output-dir")
    # The recipe writes (and marks) its own output folder: a fresh one inside ours, the earlier profile's removed.
    folder.claim("run")
    folder.remove("run")
    run_dir = folder.path / "run"

    from omegaconf import OmegaConf

    from torchtune_kd.testing import recipes

    cfg = OmegaConf.load(args.config)
    cfg.output_dir = str(run_dir)
    cfg.checkpointer.output_dir = str(run_dir)
    cfg.metric_logger.log_dir = str(run_dir / "logs")
    cfg.max_steps_per_epoch = args.steps
    recipe = recipes.load_recipe_module().KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    profiler = cProfile.Profile()
    profiler.enable()
    recipe.train()
    profiler.disable()
    recipe.cleanup()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.lines)
    print("\n".join(line for line in out.getvalue().splitlines() if any(key in line for key in SHOWN)))
    return 0

