"""Loss curves of distillation runs: one subplot per metric, one line per run, saved as a PNG.

:func:`select_plot_panels` decides which panels to draw from what the runs logged (a ``prefix/*`` pattern groups
metrics on one axis); :func:`plot_runs` draws them with matplotlib's file-only ``Agg`` backend. The runs come from
:func:`torchtune_kd.evaluation.run_logs.read_run_logs`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from torchtune_kd import output_file

PLOT_METRICS: tuple[str, ...] = ("loss", "ce_loss", "kd_loss", "ir_loss", "weight/*", "grad_norm")
_LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")


def _save(fig: Any, out: Union[str, Path], title: Optional[str], overwrite: bool) -> None:
    """Title, lay out, write the image (creating its folder; an existing file only with ``overwrite``) and free
    the figure."""
    import matplotlib.pyplot as plt

    try:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(out)
        # Staged beside ``out`` and moved into place: never half a PNG under the user's name, never a file replaced
        # unasked. The format follows out's suffix (the staging name has its own).
        with output_file.staged(out, option="out", overwrite=overwrite, overwrite_hint="overwrite=True") as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)


def select_plot_panels(
    runs: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = PLOT_METRICS
) -> list[tuple[str, list[str]]]:
    """The subplots to draw, in ``metrics`` order, as ``(title, [metric names])``.

    A plain name is one panel; a ``prefix/*`` pattern is one panel holding every present metric with that prefix
    (the effective weights ``weight/ce``, ``weight/kd``, ``weight/ir`` share an axis). Metrics no run logged are
    skipped, and so are patterns matching nothing.
    """
    present = sorted({name for series in runs.values() for name, points in series.items() if points})
    panels: list[tuple[str, list[str]]] = []
    for pattern in metrics:
        names = [n for n in present if n.startswith(pattern[:-1])] if pattern.endswith("/*") else [n for n in present if n == pattern]
        if names:
            panels.append((pattern, names))
    return panels


def plot_runs(
    runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    out: Union[str, Path],
    metrics: Sequence[str] = PLOT_METRICS,
    title: Optional[str] = None,
    overwrite: bool = False,
) -> list[str]:
    """Draw each selected metric against the step in its own subplot, one line per run; save a PNG.

    Runs are told apart by colour (single-metric panels, legend when several runs) or by line style (grouped
    ``prefix/*`` panels, where colour tells the metrics apart).

    Args:
        runs (Mapping[str, Mapping]): run label -> ``{metric: [(step, value)]}`` (from
            :func:`~torchtune_kd.evaluation.run_logs.read_run_logs`).
        out (str | Path): the PNG path (parent folders are created).
        metrics (Sequence[str]): metric names or ``prefix/*`` patterns (see :func:`select_plot_panels`).
        title (str | None): figure title.
        overwrite (bool): replace ``out`` if it exists (default: refuse; a caller replacing its own earlier plot, or
            a user asking for it, passes True).

    Returns:
        list[str]: the metric names drawn, panel by panel.

    Raises:
        ValueError: no runs, or none of the metrics is present in any run.
        output_file.OutputFileError: ``out`` exists (without ``overwrite``) or is a folder.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("runs is empty: give at least one run log.")
    panels = select_plot_panels(runs, metrics)
    if not panels:
        raise ValueError(f"none of the metrics {list(metrics)} is in the logs of runs {list(runs)}.")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, names) in zip(axes.flat, panels):
        grouped = panel.endswith("/*")
        for r, (label, series) in enumerate(runs.items()):
            for m, name in enumerate(names):
                points = series.get(name)
                if not points:
                    continue
                steps, values = zip(*points)
                if grouped:
                    line_label = name if len(runs) == 1 else f"{label}: {name}"
                    color, style = colors[m % len(colors)], _LINESTYLES[r % len(_LINESTYLES)]
                else:
                    line_label, color, style = label, colors[r % len(colors)], "-"
                ax.plot(steps, values, label=line_label, color=color, linestyle=style,
                        marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(panel[:-2] if grouped else panel)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if grouped or len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _save(fig, out, title, overwrite)
    return [name for _, names in panels for name in names]


def plot_metrics_by_step(
    curves: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]],
    out: Union[str, Path],
    metrics: Sequence[tuple[str, str]],
    references: Optional[Mapping[str, Mapping[str, float]]] = None,
    title: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Draw evaluation metrics of saved checkpoints against the training step, one subplot per metric; save a PNG.

    Args:
        curves (Mapping): run label -> ``[(step, {metric: value})]``, e.g. held-out metrics of each exported
            ``epoch_N`` folder (step 0 being the model before training).
        out (str | Path): the PNG path (parent folders are created).
        metrics (Sequence[tuple[str, str]]): ``(metric key, panel title)`` per subplot, in order.
        references (Mapping | None): label -> ``{metric: value}`` drawn as horizontal dashed lines (e.g. the
            teacher).
        title (str | None): figure title.
        overwrite (bool): replace ``out`` if it exists (default: refuse).

    Raises:
        ValueError: no curves, no metrics, or a point lacks one of the metrics.
        output_file.OutputFileError: ``out`` exists (without ``overwrite``) or is a folder.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not curves or not metrics:
        raise ValueError("plot_metrics_by_step needs at least one curve and one metric.")
    for label, points in curves.items():
        for step, values in points:
            missing = [key for key, _ in metrics if key not in values]
            if missing:
                raise ValueError(f"curve {label!r} at step {step} lacks metric(s) {missing}.")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title) in zip(axes.flat, metrics):
        for r, (label, points) in enumerate(curves.items()):
            ordered = sorted(points, key=lambda point: point[0])
            ax.plot([s for s, _ in ordered], [v[key] for _, v in ordered], label=label, marker="o", markersize=4,
                    color=colors[r % len(colors)])
        for r, (label, values) in enumerate((references or {}).items()):
            if key in values:
                ax.axhline(values[key], label=label, linestyle="--", color="0.35" if r == 0 else colors[-1 - r])
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, out, title, overwrite)
