"""Which layers to drop: students pruned from a teacher by block influence and evenly, before any training.

For every depth in ``--depths`` and method in ``--methods``, writes the pruned student (``scripts/prune.py``'s
logic: ``torchtune_kd.pruning``) under ``--out`` and evaluates it with the teacher on held-out text: perplexity,
mean KL(teacher ‖ student) per token and top-1 agreement (``torchtune_kd.evaluation.heldout_metrics``). Prints a
markdown table; choose the student's depth and method from it::

    python scripts/pruning_report.py --config configs/demo_smollm2.yaml \\
        --calibration cache/smollm2/text/train.json --heldout cache/smollm2/text/heldout.txt \\
        --depths 24,22,20 --out cache/smollm2/pruned

``--out`` must be new, empty, or a folder this script wrote (its marker file ``.torchtune_kd_outputs.json`` lists the
students it wrote; a rerun reuses or rewrites them); anything else is refused before the teacher is loaded, and a
file this script did not write is never replaced or deleted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

OWNER = "scripts/pruning_report.py"
METHODS = ("block_influence", "even")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prune every depth both ways, evaluate the students with the teacher and print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=__doc__.strip().split("\n\n")[-1])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True, help="text or alpaca .json the layers are scored on")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out plain text for the metrics")
    parser.add_argument("--depths", default="24,22,20")
    parser.add_argument("--methods", default="block_influence,even")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the pruned students (new, empty, or this script's own)")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--eval-seq-len", type=int, default=96)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    try:
        depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        parser.error(f"--depths={args.depths!r} must be comma-separated layer counts, e.g. 24,22,20")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods={args.methods!r} must name some of {', '.join(METHODS)}")
    names = [f"{n}L_{method}" for n in depths for method in methods]
    # Claimed, with every student's entry, before the teacher is loaded.
    from torchtune_kd import output_folder

    out = output_folder.claim_or_exit(args.out, owner=OWNER, option="--out")
    try:
        out.claim(*names)
    except output_folder.OutputFolderError as err:
        raise SystemExit(f"error: {err}") from None

    import torch
    from torchtune import config as tt_config, training

    from torchtune_kd import pruning
    from torchtune_kd.core import models
    from torchtune_kd.evaluation import heldout_metrics

    started = time.time()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(list(args.overrides)))
    teacher_dir = Path(str(cfg.teacher_checkpointer.checkpoint_dir))
    files = [str(name) for name in cfg.teacher_checkpointer.checkpoint_files]
    depth = int(json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"])
    state = tt_config.instantiate(cfg.teacher_checkpointer, should_load_recipe_state=False).load_checkpoint()[training.MODEL_KEY]
    plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.teacher_model).items() if k != "output_hidden_states"})
    teacher = models.build_teacher(plain, device=torch.device("cpu"), dtype=torch.float32, state_dict=state)
    del state
    try:
        windows = pruning.calibration_windows(tt_config.instantiate(cfg.tokenizer),
                                              pruning.calibration_text(args.calibration), args.seq_len, args.windows)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    scores = pruning.block_influence(teacher, windows).tolist()
    del teacher
    print("block influence per teacher layer: " + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(scores)), flush=True)

    students: dict[str, Path] = {}
    kept_by_name: dict[str, list[int]] = {}
    for n in depths:
        for method in methods:
            kept = pruning.most_influential(scores, n) if method == "block_influence" else pruning.evenly_spaced(depth, n)
            name = f"{n}L_{method}"
            # Each student's folder is an entry of --out (claimed above) with its own marker, this script's too.
            record = pruning.write_pruned_student(teacher_dir, args.out / name, kept, files=files,
                                                  info={"method": method, "block_influence": scores}, owner=OWNER)
            students[name], kept_by_name[name] = Path(record["out_dir"]), kept
            print(f"{name}: kept {kept}", flush=True)
    results = heldout_metrics.evaluate_heldout(
        {"teacher": teacher_dir, **students}, args.heldout, teacher="teacher", seq_len=args.eval_seq_len,
        max_windows=args.eval_windows,
    )
    print(f"\nheld-out: {args.heldout} ({int(results['teacher']['tokens'])} tokens); calibration: {args.calibration} "
          f"({windows.numel()} tokens); no training\n")
    print("| student | layers dropped | held-out ppl ↓ | KL(teacher ‖ student) ↓ | top-1 agreement ↑ |")
    print("|---|---|---|---|---|")
    for name, entry in results.items():
        dropped = "–" if name == "teacher" else str(sorted(set(range(depth)) - set(kept_by_name[name])))
        print(f"| {name} | {dropped} | {entry['perplexity']:.2f} | {entry['kl_to_teacher']:.4f} | "
              f"{entry['top1_agreement']:.3f} |")
    print(f"\n(total {time.time() - started:.0f} s)")
    return 0

