"""Compare two finished experiment grids setting by setting, paired by seed (e.g. a live teacher against a cache).

    python scripts/compare_grids.py outputs/prune_recovery_20L_live outputs/prune_recovery_20L --labels live,cache

Reads each grid's cells (``<grid>/cells/*/result.json``, as ``scripts/experiment.py`` writes them) and prints, for
every setting both grids ran with the same seeds, the mean ± standard error of ``B − A`` per metric; * marks a paired
t-test significant at 95%. The same seed means the same data order, so a difference is what changed between the
grids (e.g. the teacher cache's top-k coarsening), not the data. ``--out FILE`` also writes the table: an existing
file is never replaced unless ``--overwrite`` is given (checked before the grids are read), and the table is written
beside it and moved into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd import experiment, output_file

METRICS = ("heldout_ppl", "heldout_bpb", "heldout_kl", "top1_agreement")


def read_grid(folder: Path) -> list[dict]:
    """Every finished cell of a grid folder."""
    cells = sorted((folder / "cells").glob("*/result.json"))
    if not cells:
        raise SystemExit(f"error: {str(folder)!r} has no finished cells (cells/*/result.json): give a folder that "
                         "scripts/experiment.py --out wrote")
    return [experiment.load_result(path.parent) for path in cells]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("grid_a", type=Path, help="the reference grid (A)")
    parser.add_argument("grid_b", type=Path, help="the grid compared with it (B)")
    parser.add_argument("--labels", default="A,B", help="names of the two grids, comma-separated (default: A,B)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table (markdown) to this file (an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    args = parser.parse_args(argv)
    if args.out is not None:
        output_file.check_or_exit(args.out, option="--out", overwrite=args.overwrite)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != 2 or not all(labels):
        parser.error(f"--labels={args.labels!r} must name the two grids, e.g. live,cache")
    rows_a, rows_b = read_grid(args.grid_a), read_grid(args.grid_b)
    # A metric every cell has (older grids lack bits per byte; a student with another tokenizer than the teacher's
    # has no KL or agreement: None).
    metrics = [m for m in METRICS if all(r.get(m) not in (None, "") for r in rows_a + rows_b)]
    entries = experiment.compare_grids(rows_a, rows_b, metrics)
    if not entries:
        print("error: the grids share no setting with the same seeds", file=sys.stderr)
        return 2
    table = experiment.difference_table(entries, metrics, "setting", f"{labels[1]} − {labels[0]}", extra=("teacher",))
    note = (f"{labels[0]} = {args.grid_a}, {labels[1]} = {args.grid_b}; n = shared seeds; teacher = where the cells' "
            f"teacher came from in {labels[0]} / {labels[1]}; ± = standard error of the paired differences; "
            "* = paired t-test significant at 95%.")
    print(table + "\n" + note)
    if args.out is not None:
        try:
            output_file.write(args.out, table + "\n" + note + "\n", option="--out", overwrite=args.overwrite)
        except output_file.OutputFileError as err:  # the file appeared while the grids were read
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0

