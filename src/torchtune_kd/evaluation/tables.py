"""Comparison tables of lm-eval results: per model, task and metric the value, its standard error and the delta.

:func:`build_comparison` turns lm-eval results dicts into :class:`ComparisonRow` rows (value, lm-eval's standard
error, delta to a baseline), refusing results that do not compare (different documents, few-shot counts or data);
:func:`comparison_markdown` and :func:`comparison_csv` render them. Pure functions of the results dicts: nothing here
imports lm_eval or torch, so saved ``results.json`` files can be tabulated anywhere. :func:`markdown_table` is the
project's one plain markdown table (the demo's results, the experiment grids' summaries).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from torchtune_kd.evaluation.lm_eval_tasks import DEFAULT_TASKS

# The metrics the comparison table reports per task (lm-eval keys are "<metric>,<filter>", filter "none").
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc2": ("acc",),
    "hellaswag": ("acc", "acc_norm"),
    "commonsense_qa": ("acc",),
}



@dataclass(frozen=True)
class ComparisonRow:
    """One (model, task, metric) cell of the comparison.

    Attributes:
        model (str): model name.
        task (str): lm-eval task name.
        metric (str): metric name without the filter suffix (``acc``, ``acc_norm``).
        value (float): lm-eval's aggregated metric.
        stderr (float | None): lm-eval's standard error (None when lm-eval reported ``N/A``).
        n (int | None): documents scored (lm-eval's ``n-samples`` ``effective``).
        delta (float | None): ``value - baseline value`` (None for the baseline itself).
        delta_stderr (float | None): ``sqrt(stderr**2 + baseline stderr**2)``: the delta's standard error when the
            two scores are treated as independent (conservative for the same documents).
    """

    model: str
    task: str
    metric: str
    value: float
    stderr: Optional[float]
    n: Optional[int]
    delta: Optional[float]
    delta_stderr: Optional[float]


def _as_float(value: Any) -> Optional[float]:
    if value is None or isinstance(value, str):  # lm-eval writes "N/A" when it skips a stderr
        return None
    return float(value)


def task_metrics(results: Mapping[str, Any], task: str) -> tuple[str, ...]:
    """The metrics to report for ``task``: :data:`TASK_METRICS` if listed, else every ``<metric>,none`` present."""
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    scores = results.get("results", {}).get(task, {})
    return tuple(
        sorted(k.split(",")[0] for k in scores if k.endswith(",none") and "_stderr" not in k and not k.startswith("alias"))
    )


def extract_metric(results: Mapping[str, Any], task: str, metric: str, filter_name: str = "none") -> tuple[float, Optional[float]]:
    """``(value, stderr)`` of ``metric`` for ``task`` from an lm-eval results dict.

    Raises:
        ValueError: the task or metric is missing (names what is there instead).
    """
    scores = results.get("results", {})
    if task not in scores:
        raise ValueError(f"task {task!r} is not in the results (tasks there: {sorted(scores)}).")
    key, stderr_key = f"{metric},{filter_name}", f"{metric}_stderr,{filter_name}"
    if key not in scores[task]:
        raise ValueError(f"metric {key!r} is missing for task {task!r} (keys: {sorted(scores[task])}).")
    value = _as_float(scores[task][key])
    if value is None:
        raise ValueError(f"metric {key!r} of task {task!r} is {scores[task][key]!r}, not a number.")
    return value, _as_float(scores[task].get(stderr_key))


def _n_docs(results: Mapping[str, Any], task: str) -> Optional[int]:
    entry = results.get("n-samples", {}).get(task)
    return int(entry["effective"]) if isinstance(entry, Mapping) and "effective" in entry else None


def build_comparison(
    results_by_model: Mapping[str, Mapping[str, Any]],
    baseline: Optional[str] = None,
    tasks: Optional[Sequence[str]] = None,
) -> list[ComparisonRow]:
    """Rows of the comparison table: per model, task and metric the value, stderr and delta to the baseline.

    A pure function of lm-eval results dicts. Scores are only comparable on the same documents and prompts, so it
    refuses models evaluated on a different number of documents, a different few-shot count, or different data
    (offline stand-ins vs the real datasets, as recorded under ``"torchtune_kd"`` by
    :func:`~torchtune_kd.evaluation.lm_eval_runner.evaluate_models`).

    Args:
        results_by_model (Mapping[str, Mapping]): model name -> lm-eval results dict, in display order.
        baseline (str | None): model the deltas are taken against; None means the first model.
        tasks (Sequence[str] | None): tasks to report; None means the first model's tasks in
            :data:`~torchtune_kd.evaluation.lm_eval_tasks.DEFAULT_TASKS` order, then any others alphabetically.

    Returns:
        list[ComparisonRow]: grouped by model (in the given order), then task, then metric.

    Raises:
        ValueError: no models, an unknown baseline, missing tasks/metrics, or incomparable evaluations.
    """
    if not results_by_model:
        raise ValueError("results_by_model is empty: nothing to compare.")
    names = list(results_by_model)
    baseline = names[0] if baseline is None else baseline
    if baseline not in results_by_model:
        raise ValueError(f"baseline={baseline!r} is not one of the models {names}: pass one of them (--baseline NAME).")
    if tasks is None:
        present = list(results_by_model[names[0]].get("results", {}))
        tasks = [t for t in DEFAULT_TASKS if t in present] + sorted(t for t in present if t not in DEFAULT_TASKS)
    if not tasks:
        raise ValueError("no tasks to compare: the results dicts have no 'results' entries.")

    modes = {name: (r.get("torchtune_kd") or {}).get("data") for name, r in results_by_model.items()}
    if len(set(modes.values())) > 1:
        raise ValueError(f"models were evaluated on different data {modes}: offline stand-ins and real datasets do not compare.")
    for task in tasks:
        for field, reader in (("documents", _n_docs), ("few-shot examples", lambda r, t: r.get("n-shot", {}).get(t))):
            seen = {name: reader(r, task) for name, r in results_by_model.items()}
            if len(set(seen.values())) > 1:
                raise ValueError(
                    f"task {task!r} was evaluated with different numbers of {field} per model {seen}: rerun with the same "
                    "--limit / --num_fewshot so the scores are comparable."
                )

    base = {(t, m): extract_metric(results_by_model[baseline], t, m) for t in tasks for m in task_metrics(results_by_model[baseline], t)}
    rows: list[ComparisonRow] = []
    for name in names:
        results = results_by_model[name]
        for task in tasks:
            for metric in task_metrics(results_by_model[baseline], task):
                value, stderr = extract_metric(results, task, metric)
                delta = delta_se = None
                if name != baseline:
                    base_value, base_se = base[(task, metric)]
                    delta = value - base_value
                    if stderr is not None and base_se is not None:
                        delta_se = math.sqrt(stderr**2 + base_se**2)
                rows.append(ComparisonRow(name, task, metric, value, stderr, _n_docs(results, task), delta, delta_se))
    return rows


def _fmt(value: Optional[float], digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    # Round first and add 0.0 so a float-noise delta such as -8e-9 prints as +0.0000, not -0.0000.
    value = round(value, digits) + 0.0
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header row, a ``|---|`` rule, one line per row of cells (already formatted text).

    Returns:
        str: the table, ending in a newline.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: Sequence[ComparisonRow], baseline: str, digits: int = 4, note: str = "") -> str:
    """Markdown table: one row per model, one column per task/metric, cells ``value ± stderr (Δ delta)``.

    Args:
        rows (Sequence[ComparisonRow]): output of :func:`build_comparison`.
        baseline (str): the baseline's name (shown in the header line).
        digits (int): decimals.
        note (str): a line printed above the table (e.g. which data was used).

    Returns:
        str: the markdown text, ending in a newline.
    """
    columns: list[tuple[str, str]] = []
    for row in rows:
        if (row.task, row.metric) not in columns:
            columns.append((row.task, row.metric))
    models: list[str] = []
    for row in rows:
        if row.model not in models:
            models.append(row.model)
    cell = {(r.model, r.task, r.metric): r for r in rows}
    n_docs = {(r.task): r.n for r in rows}
    lines = []
    if note:
        lines += [note, ""]
    lines.append(
        f"Values are lm-eval's `value ± stderr`; Δ is the difference to `{baseline}` (± its standard error, "
        "treating the two scores as independent). Documents per task: "
        + ", ".join(f"{t} {n_docs[t] if n_docs[t] is not None else '?'}" for t in dict.fromkeys(t for t, _ in columns))
        + "."
    )
    lines.append("")
    lines.append("| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |")
    lines.append("| --- |" + " --- |" * len(columns))
    for model in models:
        cells = []
        for task, metric in columns:
            r = cell[(model, task, metric)]
            text = f"{_fmt(r.value, digits)} ± {_fmt(r.stderr, digits)}"
            if r.delta is not None:
                text += f" (Δ {_fmt(r.delta, digits, signed=True)} ± {_fmt(r.delta_stderr, digits)})"
            cells.append(text)
        label = f"{model} (baseline)" if model == baseline else model
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS: tuple[str, ...] = ("model", "task", "metric", "value", "stderr", "n", "delta", "delta_stderr", "baseline")


def comparison_csv(rows: Sequence[ComparisonRow], baseline: str) -> str:
    """Long-format CSV (one line per model/task/metric, full precision; empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        writer.writerow(
            [r.model, r.task, r.metric, repr(r.value), "" if r.stderr is None else repr(r.stderr), "" if r.n is None else r.n,
             "" if r.delta is None else repr(r.delta), "" if r.delta_stderr is None else repr(r.delta_stderr), baseline]
        )
    return buffer.getvalue()

