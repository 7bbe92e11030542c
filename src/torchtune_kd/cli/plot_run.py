"""Plot the loss components of one or more distillation runs from torchtune's DiskLogger files.

Examples:
    python scripts/plot_run.py outputs/kd_run/logs/log_1700000000.txt --out outputs/kd_run/curves.png
    # overlay runs (a run folder or its logs/ folder merges every log_*.txt, e.g. after a resume)
    python scripts/plot_run.py outputs/jsd outputs/fkl --labels JSD,forward-KL --out outputs/compare.png

Draws loss, ce_loss, kd_loss, ir_loss, every weight/* metric and grad_norm (one subplot each; metrics a run did not
log are skipped). ``--metrics`` replaces that list (``prefix/*`` patterns allowed, e.g. ``kd/*``).

``--out`` names one file: an existing file is never replaced unless ``--overwrite`` is given (checked before any log
is read); the PNG is written beside it and moved into place, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchtune_kd import output_file
from torchtune_kd.evaluation import plots, run_logs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1], allow_abbrev=False,
    )
    parser.add_argument("logs", nargs="+", type=Path, metavar="RUN_LOG", help="a log_*.txt file, a logs/ folder or a run folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per RUN_LOG (default: run folder names)")
    parser.add_argument("--metrics", default=",".join(plots.PLOT_METRICS), help="comma-separated metrics (default: %(default)s)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.logs):
        parser.error(f"--labels has {len(labels)} entries for {len(args.logs)} RUN_LOGs: give one label per run")
    output_file.check_or_exit(args.out, option="--out", overwrite=args.overwrite)
    runs: dict[str, dict] = {}
    try:
        for i, path in enumerate(args.logs):
            name, metrics = run_logs.read_run_logs(path)
            label = labels[i] if labels else name
            if label in runs:  # two runs from folders of the same name: keep both apart
                label = f"{label} ({i + 1})"
            runs[label] = metrics
        drawn = plots.plot_runs(runs, args.out, [m.strip() for m in args.metrics.split(",") if m.strip()], title=args.title,
                                overwrite=args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(runs)} run(s); metrics: {', '.join(drawn)})")
    return 0

