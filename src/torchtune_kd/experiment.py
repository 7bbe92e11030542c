"""A divergence x IR x seed grid through the real recipe, with honest statistics.

Each cell is one ``tune run <recipe>`` with overrides, evaluated the same way (held-out perplexity and top-1
agreement with the teacher, :mod:`~torchtune_kd.evaluation.heldout_metrics`). The caller names the recipe file and
the checkout to run it in (``scripts/experiment.py`` knows its own checkout); this module never guesses either from
its own location, so it behaves the same installed from a wheel (:func:`run_grid` runs a whole grid,
:func:`write_summary` writes its tables). A CE-only baseline runs for every seed with the same steps and data
order. The summary reports mean ± standard error over seeds per setting and the *paired*
difference to the baseline (same seed = same data order), mean ± standard error, marked significant only when a
paired t-test rejects "no difference" at the 95% level (|Δ| > t(n−1)·se; 4.3 se for 3 seeds). Finished cells are
skipped, so an interrupted grid resumes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from torchtune_kd import output_folder, tune_cli
from torchtune_kd.evaluation.tables import markdown_table

# name -> kd_losses class stem (the chunked variant is used when the config's loss is chunked)
DIVERGENCES = {
    "forward_kl": "ForwardKL",
    "reverse_kl": "ReverseKL",
    "symmetric_kl": "SymmetricKL",
    "jsd": "JSDistance",
    "tvd": "TVDistance",
    "skew_kl": "SkewForwardKL",
    "skew_reverse_kl": "SkewReverseKL",
    "gkd_jsd": "GeneralizedJSD",
}
BASELINE = "ce_only"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    divergence: str  # a DIVERGENCES key, or BASELINE
    ir: str  # "off" or "cosine"
    seed: int
    on_policy: float = 0.0  # the share of steps on the student's own samples (on_policy.fraction)

    @property
    def _kind(self) -> str:
        return f"{self.divergence}-op{self.on_policy:g}" if self.on_policy else self.divergence

    @property
    def name(self) -> str:
        return f"{self._kind}-ir_{self.ir}-seed{self.seed}"

    @property
    def setting(self) -> str:
        if self.divergence == BASELINE:
            return BASELINE
        return f"{self.divergence}@{self.on_policy:g}+ir_{self.ir}" if self.on_policy else f"{self.divergence}+ir_{self.ir}"


def _parse_divergence(entry: str) -> tuple[str, float]:
    """``name`` (off-policy) or ``name@fraction`` (on-policy distillation on that share of the steps)."""
    name, _, fraction = entry.partition("@")
    if not fraction:
        return name, 0.0
    try:
        value = float(fraction)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{entry!r}: the on-policy fraction after '@' must be a number in [0, 1], e.g. reverse_kl@0.5")
    return name, value


def grid(divergences: Sequence[str], irs: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Every (divergence, IR, seed) cell plus one CE-only baseline per seed; validates the names. A divergence written
    ``name@fraction`` runs on-policy on that share of the steps."""
    parsed = [_parse_divergence(d) for d in divergences]
    unknown = [d for d, _ in parsed if d not in DIVERGENCES]
    if unknown:
        raise ValueError(f"unknown divergence(s) {unknown}: choose from {sorted(DIVERGENCES)}")
    bad_ir = [i for i in irs if i not in ("off", "cosine")]
    if bad_ir:
        raise ValueError(f"unknown IR setting(s) {bad_ir}: use 'off' or 'cosine'")
    cells = [Cell(BASELINE, "off", s) for s in seeds]
    cells += [Cell(d, i, s, fraction) for d, fraction in parsed for i in irs for s in seeds]
    return cells


def cell_overrides(
    cell: Cell,
    *,
    chunked: bool,
    mapping: str,
    scales: Mapping[str, float],
    base_kd_keys: Iterable[str] = (),
    teacher_cache: Optional[str] = None,
) -> list[str]:
    """The CLI overrides that turn the base config into this cell.

    Args:
        cell: the cell.
        chunked: whether the base config's losses are chunked (picks ``...WithChunkedOutputLoss``).
        mapping: the layer mapping used when IR is on (CLI syntax, e.g. ``[[0,1],[1,3]]`` or ``auto``).
        scales: ``{ce, kd, ir}`` weights of KD cells.
        base_kd_keys: keys of the base config's ``kd_loss`` block (arguments a divergence does not take are removed).
        teacher_cache: a teacher cache folder (``recipes/cache_teacher.py``) that cells without IR distil from; cells
            with IR need the teacher's hidden states and run it live.
    """
    out = [f"seed={cell.seed}"]
    ir_on = cell.ir == "cosine" and cell.divergence != BASELINE
    if ir_on:
        out += [f"layer_mapping={mapping}", "model.output_hidden_states=true", "teacher_model.output_hidden_states=true",
                "ir_loss._component_=kd_losses.CosineIRLoss"]
    else:
        out += ["layer_mapping=null", "model.output_hidden_states=false", "teacher_model.output_hidden_states=false"]
        if teacher_cache is not None:
            out.append(f"teacher_cache.path={teacher_cache}")
    if cell.divergence == BASELINE:
        weights = {"ce": 1.0, "kd": 0.0, "ir": 0.0}
        stem = "ForwardKL"  # computed and logged for comparison, weight 0
    else:
        weights = {"ce": scales["ce"], "kd": scales["kd"], "ir": scales["ir"] if ir_on else 0.0}
        stem = DIVERGENCES[cell.divergence]
    component = f"kd_losses.{stem}{'WithChunkedOutputLoss' if chunked else 'Loss'}"
    takes = {"lambda_weight"} if stem in ("SymmetricKL", "JSDistance") else set()
    takes |= {"alpha"} if stem.startswith("Skew") else set()
    takes |= {"beta"} if stem == "GeneralizedJSD" else set()
    out += [f"~kd_loss.{key}" for key in sorted(set(base_kd_keys) & {"lambda_weight", "alpha", "beta"} - takes)]
    if cell.on_policy:
        out.append(f"on_policy.fraction={cell.on_policy:g}")
    out += [
        f"kd_loss._component_={component}",
        "loss_scaling.enabled=true",
        "loss_scaling.method=manual",
        f"loss_scaling.manual_scales.ce={weights['ce']}",
        f"loss_scaling.manual_scales.kd={weights['kd']}",
        f"loss_scaling.manual_scales.ir={weights['ir']}",
    ]
    return out


def uses_cache(cell: Cell) -> bool:
    """Whether a grid with a teacher cache runs this cell from it (IR cells need the live teacher)."""
    return not (cell.ir == "cosine" and cell.divergence != BASELINE)


def run_cell(
    cell: Cell,
    *,
    recipe: Path,
    workdir: Path,
    config: Path,
    out_dir: Path,
    overrides: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    log_file: Optional[Path] = None,
) -> Path:
    """Run the recipe for one cell (``tune run`` in a subprocess); returns the last exported ``epoch_N`` folder.

    Args:
        cell: the cell (named in the error message).
        recipe: the recipe file inside ``workdir``, e.g. ``<checkout>/recipes/knowledge_distillation_single_device.py``
            (absolute, or relative to ``workdir``).
        workdir: the subprocess's working directory: the checkout holding the ``recipes`` package.
        config: the base config file.
        out_dir: the run's ``output_dir`` (an existing run there is overwritten).
        overrides: ``key=value`` overrides after the config.
        env: extra environment variables for the subprocess.
        log_file: where the subprocess's output goes (default: discarded).

    Returns:
        Path: the run's last ``epoch_N`` export folder.

    Raises:
        ValueError: ``recipe`` is not a file inside ``workdir``.
        RuntimeError: the run failed.
    """
    workdir = Path(workdir).resolve()
    recipe_file = (workdir / recipe).resolve()
    if not recipe_file.is_file() or workdir not in recipe_file.parents:
        raise ValueError(f"recipe={str(recipe)!r} is not a file inside workdir={str(workdir)!r}.")
    # torchtune runs a recipe given by path as a module whose dotted name is that path (`recipes/x.py` ->
    # `recipes.x`), imported from the working directory: the path must be relative to it, never absolute.
    recipe_arg = recipe_file.relative_to(workdir).as_posix()
    # The folder is this grid's own and a rerun redoes an unfinished cell (the recipe refuses an existing run's
    # folder otherwise).
    overrides = [f"output_dir={out_dir}", "overwrite_output_dir=true", *overrides]
    with open(log_file or os.devnull, "w") as sink:
        result = tune_cli.tune_run(recipe_arg, config, overrides, cwd=workdir, env=env, stdout=sink)
    if result.returncode != 0:
        raise RuntimeError(f"cell {cell.name} failed (exit {result.returncode}); see {log_file}")
    exports = sorted(out_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    return exports[-1]


# The teacher-cache pre-pass, relative to the checkout (torchtune imports a recipe path as `recipes.<name>`).
CACHE_PREPASS = "recipes/cache_teacher.py"


def run_grid(
    cells: Sequence[Cell],
    out: output_folder.OwnedFolder,
    *,
    checkout: Path,
    recipe: Path,
    config: Path,
    overrides: Sequence[str],
    command: str,
    steps: int,
    mapping: str,
    scales: Mapping[str, float],
    heldout: Path,
    eval_seq_len: int,
    eval_windows: int,
    env: Optional[Mapping[str, str]] = None,
    teacher_cache: Optional[Path] = None,
    cache_top_k: int = 64,
    onpolicy_eval: Optional[Mapping[str, object]] = None,
) -> list[dict[str, object]]:
    """Run every cell not finished before (each one ``tune run``, then evaluated on held-out text).

    Each cell's run goes to ``<out>/cells/<cell>/run`` (its log beside it), its result to ``result.json`` there; a
    cell with a ``result.json`` is read back, not run again, so an interrupted grid resumes. The runs' training states
    are deleted once evaluated.

    Args:
        cells (Sequence[Cell]): the grid (:func:`grid`).
        out (OwnedFolder): the grid's folder, claimed by the caller with ``command.txt`` and ``cells``.
        checkout (Path): the checkout the recipes run in (their working directory).
        recipe (Path): the distillation recipe file inside ``checkout``.
        config (Path): the base config.
        overrides (Sequence[str]): ``key=value`` overrides for every run (``~key`` removals too).
        command (str): the command line, written to ``command.txt``.
        steps (int): optimiser steps per run.
        mapping (str): the layer mapping of cells with IR.
        scales (Mapping[str, float]): ``{ce, kd, ir}`` weights of the KD cells.
        heldout (Path): held-out plain text.
        eval_seq_len (int): evaluation window length.
        eval_windows (int): evaluation windows.
        env (Optional[Mapping[str, str]]): extra environment variables of the runs (e.g. ``KD_ASSETS``).
        teacher_cache (Optional[Path]): run the teacher once into this cache and distil every cell without IR from
            it; cells with IR run the teacher live.
        cache_top_k (int): k of the teacher cache.
        onpolicy_eval (Optional[Mapping[str, object]]): also the on-policy held-out metrics
            (``heldout_metrics.evaluate_on_policy``): ``data`` (a data file of held-out prompts in the dataset's
            format), ``prompts`` (how many), ``max_new_tokens`` and ``seed``.

    Returns:
        list[dict]: one result row per cell, in grid order.

    Raises:
        SystemExit: the teacher-cache pre-pass failed (the message names its log).
        RuntimeError: a cell's run failed (see :func:`run_cell`).
    """
    from omegaconf import OmegaConf

    from torchtune_kd.evaluation import heldout_metrics

    env = dict(env or {})
    base = OmegaConf.load(config)
    base = OmegaConf.merge(base, OmegaConf.from_dotlist([o for o in overrides if not o.startswith("~")]))
    teacher_dir = Path(str(base.teacher_checkpointer.checkpoint_dir))
    chunked = str(base.kd_loss._component_).endswith("WithChunkedOutputLoss")
    base_kd_keys = [k for k in base.kd_loss.keys() if k != "_component_"]

    (out.path / "command.txt").write_text(command + "\n")
    cache = None
    if teacher_cache is not None:
        cache = str(teacher_cache.resolve())
        started = time.time()
        print(f"[experiment] teacher cache {cache} (k={cache_top_k}): one pre-pass for the whole grid ...", flush=True)
        result = tune_cli.tune_run(
            CACHE_PREPASS, config, [f"teacher_cache.path={cache}", f"teacher_cache.top_k={cache_top_k}", *overrides],
            cwd=checkout, env=env,
        )
        out.path_of("teacher_cache.log").write_text(result.stdout or "")
        if result.returncode != 0:
            raise SystemExit(f"the teacher-cache pre-pass failed (exit {result.returncode}); see "
                             f"{out.path / 'teacher_cache.log'}")
        print(f"[experiment]   cache ready ({time.time() - started:.0f} s)")
    prompts = None
    if onpolicy_eval is not None:
        prompts = heldout_metrics.dataset_prompts(base, Path(str(onpolicy_eval["data"])), int(onpolicy_eval["prompts"]))
    rows = []
    for index, cell in enumerate(cells, 1):
        cell_dir = out.path / "cells" / cell.name
        result = load_result(cell_dir)
        if result is not None:
            print(f"[experiment] {index}/{len(cells)} {cell.name}: done before, skipped")
            rows.append(result)
            continue
        cell_args = cell_overrides(
            cell, chunked=chunked, mapping=mapping, scales=scales, base_kd_keys=base_kd_keys, teacher_cache=cache,
        )
        cell_args += [f"max_steps_per_epoch={steps}", "epochs=1", f"metric_logger.log_dir={cell_dir / 'run' / 'logs'}"]
        cell_args += list(overrides)
        started = time.time()
        print(f"[experiment] {index}/{len(cells)} {cell.name}: training {steps} steps ...", flush=True)
        cell_dir.mkdir(parents=True, exist_ok=True)
        export = run_cell(
            cell, recipe=recipe, workdir=checkout, config=config, out_dir=cell_dir / "run", overrides=cell_args,
            env=env, log_file=cell_dir / "train.log",
        )
        metrics = heldout_metrics.evaluate_heldout(
            {"student": export, "teacher": teacher_dir}, heldout, teacher="teacher",
            seq_len=eval_seq_len, max_windows=eval_windows,
        )["student"]
        result = {"cell": cell.name, "setting": cell.setting, "divergence": cell.divergence, "ir": cell.ir,
                  "seed": cell.seed, "heldout_ppl": metrics["perplexity"], "heldout_nll": metrics["nll"],
                  "heldout_bpb": metrics["bits_per_byte"],
                  # None for a student with another tokenizer than the teacher's (no shared token positions).
                  "heldout_kl": metrics.get("kl_to_teacher"), "top1_agreement": metrics.get("top1_agreement"),
                  "seconds": round(time.time() - started, 1),
                  "teacher": "cache" if cache is not None and uses_cache(cell) else "live",
                  "on_policy": cell.on_policy}
        if prompts is not None:
            result.update(heldout_metrics.evaluate_on_policy(
                export, teacher_dir, prompts, max_new_tokens=int(onpolicy_eval["max_new_tokens"]),
                seed=int(onpolicy_eval["seed"]),
            ))
            result["seconds"] = round(time.time() - started, 1)
        (cell_dir / "result.json").write_text(json.dumps(result, indent=2))
        rows.append(result)
        on_policy_note = (f"  on-policy KL {result['onpolicy_kl']:.4f}  teacher NLL {result['onpolicy_teacher_nll']:.4f}"
                          if prompts is not None else "")
        teacher_note = (f"  KL to teacher {result['heldout_kl']:.4f}  agreement {result['top1_agreement']:.4f}"
                        if result["heldout_kl"] is not None else "")
        print(f"[experiment]   ppl {result['heldout_ppl']:.3f}  bits/byte {result['heldout_bpb']:.4f}{teacher_note}"
              f"{on_policy_note}  ({result['seconds']} s)")
        # The run's training state (optimiser, weights) is not needed once evaluated. The run is this grid's own: it
        # lies inside the cells/ entry the grid's folder lists.
        state = cell_dir / "run" / "training_state"
        if state.exists():
            shutil.rmtree(state)
    return rows


SUMMARY_NOTE = ("n = seeds; ± = standard error over seeds; Δ is paired by seed (same data order) against ce_only; "
                "* marks a paired t-test significant at 95% (|Δ| > t(n-1) · se, i.e. 4.3 se for 3 seeds).")


def write_summary(out_dir: Path, rows: Sequence[Mapping[str, object]]) -> str:
    """Write ``results.csv``, ``summary.csv`` and ``summary.md`` of a finished grid into ``out_dir`` and print the
    tables: mean ± se per setting with Δ vs CE-only, and what cosine IR adds to each divergence (when the grid has
    both IR settings). Returns the text of ``summary.md``."""
    write_rows(out_dir / "results.csv", rows)
    # Results written before bits per byte existed lack heldout_bpb; cells of a student with another tokenizer have
    # no KL or agreement (None): each is summarised only when every cell has it.
    def every(metric: str) -> bool:
        return bool(rows) and all(r.get(metric) not in (None, "") for r in rows)

    metrics = [m for m in ("heldout_ppl", "heldout_bpb", "heldout_kl", "top1_agreement") if every(m)]
    # The on-policy held-out metrics (scripts/experiment.py --onpolicy-eval-data), when every cell has them.
    metrics += [m for m in ON_POLICY_METRICS if rows and all(m in r for r in rows)]
    summary = summarise(rows, metrics)
    table = summary_table(summary, metrics)
    write_rows(out_dir / "summary.csv", summary)
    print("\n" + table)
    print(SUMMARY_NOTE)
    text = table + "\n" + SUMMARY_NOTE + "\n"
    effects = ir_effect(rows, metrics)
    if effects:
        ir_table = difference_table(effects, metrics, "divergence", "IR on − off")
        ir_note = "What cosine IR adds to each divergence: <divergence>+ir_cosine − <divergence>+ir_off, paired by seed."
        if any(r.get("teacher") == "cache" for r in rows):
            ir_note += (" Caution: here the cells without IR read the teacher cache and the IR cells ran the teacher live, "
                        "so this mixes IR with the cache's top-k coarsening (run without --teacher-cache to separate them).")
        print("\n" + ir_table + ir_note)
        text += "\n" + ir_table + "\n" + ir_note + "\n"
    versus = on_policy_effect(rows, metrics)
    if versus:
        op_table = difference_table(versus, metrics, "setting", f"− {OFF_POLICY_REFERENCE}")
        op_note = (f"Each on-policy setting against off-policy {OFF_POLICY_REFERENCE.split('+')[0]} (the recipe's default "
                   "objective), paired by seed: negative Δ is better for every metric but top1_agreement.")
        print("\n" + op_table + op_note)
        text += "\n" + op_table + "\n" + op_note + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


# The held-out on-policy metrics: on continuations the student samples from held-out prompts, the mean per-token
# KL(student ‖ teacher) and the teacher's mean per-token NLL of them (heldout_metrics.evaluate_on_policy).
ON_POLICY_METRICS = ("onpolicy_kl", "onpolicy_teacher_nll")
OFF_POLICY_REFERENCE = "forward_kl+ir_off"


def on_policy_effect(rows: Iterable[Mapping[str, object]], metrics: Sequence[str]) -> list[dict[str, object]]:
    """Every on-policy setting (``<d>@<fraction>+ir_<ir>``) minus off-policy forward KL, paired by seed (empty when
    the grid has no on-policy cell or no off-policy forward KL)."""
    rows = list(rows)
    reference = _by_seed(rows, OFF_POLICY_REFERENCE)
    settings = sorted({str(r["setting"]) for r in rows if "@" in str(r["setting"])})
    if not reference or not settings:
        return []
    effects = []
    for setting in settings:
        seeds = _by_seed(rows, setting)
        entry: dict[str, object] = {"setting": setting, "n": len(set(seeds) & set(reference))}
        for metric in metrics:
            entry.update(paired_difference(reference, seeds, metric))
        effects.append(entry)
    return effects


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided critical value of Student's t for ``df`` degrees of freedom (``n - 1`` paired differences).

    With 3 seeds a difference must exceed 4.30 standard errors, not 2: few seeds make the standard error itself
    uncertain.

    Args:
        df: degrees of freedom.
        confidence: two-sided confidence level. Default 0.95.

    Returns:
        float: ``t`` with ``P(|T| <= t) = confidence``; ``inf`` for ``df < 1`` (no spread can be estimated).
    """
    if df < 1:
        return math.inf
    # Imported here: scipy.stats takes about a second to import and only summaries need it.
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); se is nan for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return mean, se


def summarise(rows: Iterable[Mapping[str, object]], metrics: Sequence[str]) -> list[dict[str, object]]:
    """Per setting: mean ± se of each metric over seeds, and the paired difference to the CE-only baseline.

    Args:
        rows: one mapping per finished cell with ``setting``, ``seed`` and the metric values.
        metrics: metric names to summarise.

    Returns:
        list of dicts: ``setting``, ``n``, ``<metric>_mean``, ``<metric>_se``, ``<metric>_diff``, ``<metric>_diff_se``,
        ``<metric>_significant`` (a paired t-test at 95%: |diff| > t(n−1) · se of the paired differences).
    """
    rows = list(rows)
    by_setting: dict[str, dict[int, Mapping[str, object]]] = {}
    for row in rows:
        by_setting.setdefault(str(row["setting"]), {})[int(row["seed"])] = row
    baseline = by_setting.get(BASELINE, {})
    summary = []
    for setting in sorted(by_setting, key=lambda s: (s != BASELINE, s)):
        seeds = by_setting[setting]
        entry: dict[str, object] = {"setting": setting, "n": len(seeds)}
        for metric in metrics:
            values = [float(r[metric]) for r in seeds.values()]
            entry[f"{metric}_mean"], entry[f"{metric}_se"] = mean_se(values)
            if setting != BASELINE and set(seeds) & set(baseline):
                entry.update(paired_difference(baseline, seeds, metric))
        summary.append(entry)
    return summary


def paired_difference(
    before: Mapping[int, Mapping[str, object]], after: Mapping[int, Mapping[str, object]], metric: str
) -> dict[str, object]:
    """Mean ± se of ``after − before`` over the seeds both have, and a paired t-test at 95%.

    Args:
        before, after: seed -> finished cell (with ``metric``).
        metric: the metric compared.

    Returns:
        dict: ``<metric>_diff``, ``<metric>_diff_se``, ``<metric>_significant`` (|diff| > t(n−1) · se; never with
        fewer than 2 shared seeds) and ``<metric>_pairs`` (the number of shared seeds).
    """
    paired = [float(after[s][metric]) - float(before[s][metric]) for s in sorted(set(before) & set(after))]
    diff, diff_se = mean_se(paired)
    return {
        f"{metric}_diff": diff,
        f"{metric}_diff_se": diff_se,
        f"{metric}_significant": bool(not math.isnan(diff_se) and abs(diff) > t_critical(len(paired) - 1) * diff_se),
        f"{metric}_pairs": len(paired),
    }


def _by_seed(rows: Iterable[Mapping[str, object]], setting: str) -> dict[int, Mapping[str, object]]:
    return {int(r["seed"]): r for r in rows if str(r["setting"]) == setting}


def ir_effect(rows: Iterable[Mapping[str, object]], metrics: Sequence[str]) -> list[dict[str, object]]:
    """What cosine IR adds to each divergence: ``<d>+ir_cosine − <d>+ir_off`` per metric, paired by seed.

    Only divergences with both settings finished appear. Returns one dict per divergence: ``divergence``, ``n``
    (shared seeds) and :func:`paired_difference`'s entries per metric.
    """
    rows = list(rows)
    divergences = sorted({str(r["divergence"]) for r in rows if str(r["divergence"]) != BASELINE})
    effects = []
    for divergence in divergences:
        off, on = _by_seed(rows, f"{divergence}+ir_off"), _by_seed(rows, f"{divergence}+ir_cosine")
        shared = set(off) & set(on)
        if not shared:
            continue
        entry: dict[str, object] = {"divergence": divergence, "n": len(shared)}
        for metric in metrics:
            entry.update(paired_difference(off, on, metric))
        effects.append(entry)
    return effects


def compare_grids(
    rows_a: Iterable[Mapping[str, object]], rows_b: Iterable[Mapping[str, object]], metrics: Sequence[str]
) -> list[dict[str, object]]:
    """The same settings in two grids (e.g. a live teacher against a teacher cache): ``b − a`` paired by seed.

    Returns one dict per setting present in both: ``setting``, ``n``, ``teacher`` (the cells' teacher source in
    ``a`` / in ``b``, e.g. ``live / cache``) and :func:`paired_difference`'s entries.
    """
    rows_a, rows_b = list(rows_a), list(rows_b)
    settings = sorted({str(r["setting"]) for r in rows_a} & {str(r["setting"]) for r in rows_b},
                      key=lambda s: (s != BASELINE, s))
    out = []
    for setting in settings:
        a, b = _by_seed(rows_a, setting), _by_seed(rows_b, setting)
        if not set(a) & set(b):
            continue
        entry: dict[str, object] = {"setting": setting, "n": len(set(a) & set(b))}
        # Which teacher each grid's cells used (a cache or live), when the results record it.
        sources = [sorted({str(r.get("teacher", "?")) for r in side.values()}) for side in (a, b)]
        entry["teacher"] = " / ".join(",".join(source) for source in sources)
        for metric in metrics:
            entry.update(paired_difference(a, b, metric))
        out.append(entry)
    return out


def difference_table(
    entries: Sequence[Mapping[str, object]], metrics: Sequence[str], key: str, what: str, extra: Sequence[str] = ()
) -> str:
    """A markdown table of paired differences (from :func:`ir_effect` or :func:`compare_grids`), * = significant;
    ``extra`` names entry fields shown as columns after ``n``."""
    header = [key, "n", *extra] + [f"Δ {m} ({what})" for m in metrics]
    rows = []
    for entry in entries:
        cells = [str(entry[key]), str(entry["n"]), *(str(entry[field]) for field in extra)]
        for m in metrics:
            mark = " *" if entry[f"{m}_significant"] else ""
            cells.append(_fmt(float(entry[f"{m}_diff"]), float(entry[f"{m}_diff_se"])) + mark)
        rows.append(cells)
    return markdown_table(header, rows)


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mean:.{digits}f}"


def summary_table(summary: Sequence[Mapping[str, object]], metrics: Sequence[str]) -> str:
    """Markdown: mean ± se per setting (:func:`summarise`), and Δ vs CE-only (paired by seed) with a * where a paired
    t-test rejects Δ = 0 at 95%."""
    header = ["setting", "n"] + [m for m in metrics] + [f"Δ {m} vs {BASELINE}" for m in metrics]
    rows = []
    for entry in summary:
        cells = [str(entry["setting"]), str(entry["n"])]
        cells += [_fmt(entry[f"{m}_mean"], entry[f"{m}_se"]) for m in metrics]
        for m in metrics:
            if f"{m}_diff" in entry:
                mark = " *" if entry[f"{m}_significant"] else ""
                cells.append(_fmt(entry[f"{m}_diff"], entry[f"{m}_diff_se"]) + mark)
            else:
                cells.append("–")
        rows.append(cells)
    return markdown_table(header, rows)


def write_rows(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def load_result(cell_dir: Path) -> Optional[dict[str, object]]:
    path = cell_dir / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None
