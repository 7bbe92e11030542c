"""Where the single-device recipe spends a run's training time, by function (cProfile, cumulative).

Runs ``train()`` of ``recipes/knowledge_distillation_single_device.py`` in-process on a config (e.g. one that
``scripts/bench_recipe.py`` wrote) and prints the recipe's, the training core's, the losses' and torchtune's
transformer calls with their cumulative time::

    python scripts/profile_recipe.py cache/bench_recipe/ours_fkl_v32000_s256.yaml --steps 6

``--vocab-passes`` instead runs one optimiser step under ``torchtune_kd.testing.vocab_passes.VocabPasses`` and prints
the passes it makes over ``[tokens, vocab]`` tensors, per ATen operation, against the minimum of three; ``--set
KEY=VALUE`` overrides the config (e.g. ``--set fused_output.enabled=false`` for the unfused path)::

    python scripts/profile_recipe.py configs/tiny_cpu.yaml --vocab-passes --set diagnostics_every_n_steps=1

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


def vocab_pass_table(recipe) -> str:
    """One optimiser step of a set-up recipe under ``VocabPasses``: a markdown table of passes per operation."""
    from torchtune_kd.core import fused_output
    from torchtune_kd.testing.vocab_passes import VocabPasses

    batches = next(recipe._micro_batches())
    tokens = sum(batch["tokens"].numel() for batch in batches)
    models = [m for m in (recipe._model, recipe._teacher_model) if m is not None]
    weights = [m.tok_embeddings.weight for m in models]
    for model in models:
        try:
            weights.append(fused_output.output_weight(model))
        except ValueError:  # LoRA on the output layer: its base weight
            weights.append(model.output.weight)
    vocab = weights[0].shape[0]
    counters = {}
    for diagnose in (False, True):
        recipe._diagnose = diagnose
        with VocabPasses(vocab, tokens, weights) as counters[diagnose]:
            recipe._accumulate_gradients(batches)
        recipe._optimizer.zero_grad(set_to_none=True)
    path = "fused" if recipe._output_pass.fused else "unfused"
    names = sorted(set(counters[True].passes) | set(counters[False].passes), key=lambda n: -counters[True].passes[n])
    lines = [f"{path} output pass, {type(recipe._losses.kd_loss).__name__}, {tokens} tokens x vocab {vocab:,}",
             "| operation | passes over [tokens, vocab] | with the diagnostics |", "|---|---|---|"]
    lines += [f"| {name} | {counters[False].passes[name]:.2f} | {counters[True].passes[name]:.2f} |" for name in names]
    lines.append(f"| **total** (minimum 3: student logits, teacher logits, their gradient through the student's output "
                 f"layer) | **{counters[False].total:.2f}** | **{counters[True].total:.2f}** |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the recipe under cProfile and print the lines of the project's and torchtune's calls; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output-dir", type=Path, default=checkout_dir() / "cache" / "profile_recipe",
                        help="new, empty, or this script's own folder; the run goes to its run/ (default: %(default)s)")
    parser.add_argument("--lines", type=int, default=45, help="functions read from the top of the profile")
    parser.add_argument("--vocab-passes", action="store_true",
                        help="count one step's passes over [tokens, vocab] tensors instead of profiling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
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
    if args.set:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.set))
    cfg.output_dir = str(run_dir)
    cfg.checkpointer.output_dir = str(run_dir)
    cfg.metric_logger.log_dir = str(run_dir / "logs")
    cfg.max_steps_per_epoch = args.steps
    recipe = recipes.load_recipe_module().KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    if args.vocab_passes:
        print(vocab_pass_table(recipe))
        recipe.cleanup()
        return 0
    profiler = cProfile.Profile()
    profiler.enable()
    recipe.train()
    profiler.disable()
    recipe.cleanup()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.lines)
    print("\n".join(line for line in out.getvalue().splitlines() if any(key in line for key in SHOWN)))
    return 0

