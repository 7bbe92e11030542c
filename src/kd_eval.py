"""Evaluation of exported students with lm-eval, offline task stand-ins, comparison tables and run-log parsing.

Three concerns live here, all without torchtune's ``eleuther_eval`` recipe (torchtune 0.6.1 compares lm-eval
versions as strings, rejects 0.4.10+, and builds ``HFLM(pretrained="gpt2")``, which needs the hub):

* **Offline task data.** :func:`write_offline_task_yamls` writes task YAMLs that ``include:`` lm-eval's *installed*
  ``hellaswag`` / ``commonsense_qa`` / ``truthfulqa_mc2`` YAMLs and override only the dataset fields
  (``dataset_path: json`` + the project's files under ``data/lm_eval/``). The task names stay the same, so passing
  the folder as ``include_path`` replaces the built-in tasks while lm-eval's own prompt building
  (``process_docs``, ``doc_to_text``) and scoring (``process_results``) run unchanged.
* **Evaluation.** :func:`validate_model_dir` refuses folders lm-eval would load wrongly (adapter or projection
  files beside merged weights) or score meaninglessly (NaN/inf weights of a diverged run, found by
  :func:`check_finite_weights`), :func:`run_lm_eval` calls ``lm_eval.simple_evaluate`` on one folder, and
  :func:`build_comparison` turns lm-eval results dicts into rows (value, lm-eval's standard error, delta to a
  baseline) rendered by :func:`comparison_markdown` / :func:`comparison_csv`.
* **Run logs.** :func:`parse_disk_log` reads torchtune's ``DiskLogger`` files into ``{metric: [(step, value)]}`` and
  :func:`plot_runs` draws the loss components of one or more runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_DATA_DIR = REPO_ROOT / "data" / "lm_eval"

DEFAULT_TASKS: tuple[str, ...] = ("truthfulqa_mc2", "hellaswag", "commonsense_qa")

# The metrics the comparison table reports per task (lm-eval keys are "<metric>,<filter>", filter "none").
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc2": ("acc",),
    "hellaswag": ("acc", "acc_norm"),
    "commonsense_qa": ("acc",),
}

# Files whose presence beside merged weights makes a folder unsafe to evaluate. With peft installed,
# transformers 5 applies an adapter found in the folder *on top of* the already merged weights, so lm-eval
# would silently score a different model; projection files mean the folder is a training output, not an export.
_ADAPTER_PATTERNS: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "adapter_*.pt")
_PROJECTION_PATTERNS: tuple[str, ...] = ("projection*.pt", "projection*.safetensors", "projection*.bin")
_WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class OfflineTask:
    """How one lm-eval task maps onto the project's local data files.

    Attributes:
        upstream_yaml (str): the task's YAML relative to ``lm_eval/tasks`` (the file our YAML includes).
        splits (dict[str, str]): lm-eval split field (``training_split`` ...) -> split name in ``data_files``.
        folder (str): sub-folder of the data directory holding ``<split>.jsonl``.
    """

    upstream_yaml: str
    splits: Mapping[str, str]
    folder: str


OFFLINE_TASKS: dict[str, OfflineTask] = {
    # hellaswag / commonsense_qa draw few-shot examples from their training split, so both splits are shipped.
    "hellaswag": OfflineTask(
        "hellaswag/hellaswag.yaml", {"training_split": "train", "validation_split": "validation"}, "hellaswag"
    ),
    "commonsense_qa": OfflineTask(
        "commonsense_qa/default.yaml", {"training_split": "train", "validation_split": "validation"}, "commonsense_qa"
    ),
    # truthfulqa is zero-shot by design (its YAML carries a fixed six-question preamble): validation only.
    "truthfulqa_mc2": OfflineTask("truthfulqa/truthfulqa_mc2.yaml", {"validation_split": "validation"}, "truthfulqa_mc2"),
}


# --------------------------------------------------------------------------------------------- offline task data
def lm_eval_tasks_dir() -> Path:
    """The installed ``lm_eval/tasks`` folder (found from the package, never hard-coded)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def write_offline_task_yamls(
    out_dir: Union[str, Path],
    tasks: Sequence[str] = DEFAULT_TASKS,
    data_dir: Union[str, Path] = OFFLINE_DATA_DIR,
) -> dict[str, Path]:
    """Write one YAML per task that includes lm-eval's own task YAML and points it at local JSONL files.

    Only ``dataset_path``, ``dataset_name``, ``dataset_kwargs`` and the split fields are overridden; the task name
    is kept, so ``--include_path out_dir`` (or ``TaskManager(include_path=out_dir)``) shadows the built-in task.
    Every ``!function`` reference of the included YAMLs is resolved once here (relative to the *included* file, as
    lm-eval does), so a broken include fails now rather than silently falling back to the hub-backed task.

    Args:
        out_dir (str | Path): folder to write ``<task>.yaml`` into (created if missing).
        tasks (Sequence[str]): task names; each must be a key of :data:`OFFLINE_TASKS`.
        data_dir (str | Path): folder holding ``<task folder>/<split>.jsonl``.

    Returns:
        dict[str, Path]: task name -> written YAML path.

    Raises:
        ValueError: a task has no local data, a data file or lm-eval's YAML is missing, or an included
            ``!function`` does not resolve.
    """
    import yaml

    from lm_eval.tasks._yaml_loader import load_yaml

    out_dir = Path(out_dir).resolve()
    data_dir = Path(data_dir).resolve()
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ValueError(
            f"tasks={unknown} have no offline stand-in data (available: {sorted(OFFLINE_TASKS)}); "
            "use data='online' (--data online) for other tasks, or add files under data/lm_eval/ and an OFFLINE_TASKS entry."
        )
    tasks_dir = lm_eval_tasks_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task in tasks:
        spec = OFFLINE_TASKS[task]
        upstream = tasks_dir / spec.upstream_yaml
        if not upstream.is_file():
            raise ValueError(
                f"lm-eval's YAML for task {task!r} is not at {upstream}: the installed lm-eval layout differs from "
                "0.4.13 (see requirements.txt); update OFFLINE_TASKS in kd_eval.py."
            )
        data_files: dict[str, str] = {}
        for split in spec.splits.values():
            path = data_dir / spec.folder / f"{split}.jsonl"
            if not path.is_file():
                raise ValueError(f"data_dir={str(data_dir)!r} lacks {path.relative_to(data_dir)} for task {task!r}.")
            data_files[split] = str(path)
        config: dict[str, Any] = {
            # Absolute: lm-eval resolves a relative include against *this* file, which lives in a temp folder.
            "include": str(upstream),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files},
            "training_split": None,
            "validation_split": None,
            "test_split": None,
        }
        config.update(spec.splits)
        path = out_dir / f"{task}.yaml"
        path.write_text(
            "# Generated by kd_eval.write_offline_task_yamls: lm-eval's own task on the project's local data.\n"
            + yaml.safe_dump(config, sort_keys=False),
            encoding="utf-8",
        )
        try:
            merged = load_yaml(path, resolve_func=True, recursive=True)
        except Exception as err:  # lm-eval raises ImportError / AttributeError / ValueError here
            raise ValueError(f"the generated YAML {path} does not load through lm-eval: {err}") from err
        if merged.get("task") != task or merged.get("dataset_path") != "json":
            raise ValueError(f"the generated YAML {path} resolved to {merged.get('task')!r} / {merged.get('dataset_path')!r}")
        for key, value in merged.items():
            if key in ("process_docs", "process_results") and not callable(value):
                raise ValueError(f"{key} of task {task!r} did not resolve to a function (got {value!r})")
        written[task] = path
    return written


# --------------------------------------------------------------------------------------------- model folders
def _matches(folder: Path, patterns: Iterable[str]) -> list[str]:
    return sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def validate_model_dir(path: Union[str, Path], require_tokenizer: bool = True, check_weights: bool = True) -> Path:
    """Check that a folder is a clean Hugging Face model export that lm-eval's ``hf`` model will load as-is.

    Args:
        path (str | Path): the model folder (e.g. a torchtune ``epoch_N/`` output).
        require_tokenizer (bool): also require tokenizer files in the folder (turn off when a separate tokenizer
            folder is given to lm-eval).
        check_weights (bool): also read every ``*.safetensors`` weight and refuse NaN/inf values (see
            :func:`check_finite_weights`; one pass over the weights, tensor by tensor). Default True.

    Returns:
        Path: the resolved folder.

    Raises:
        ValueError: the folder is missing, lacks ``config.json`` / weights / shards / tokenizer files, holds
            adapter or projection files beside the merged weights, or (``check_weights``) has a safetensors file
            that cannot be read or holds a non-finite weight.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"model folder {str(path)!r} does not exist (or is not a directory).")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {str(folder)!r} has no config.json: pass a Hugging Face model folder such as epoch_N/.")
    adapters = _matches(folder, _ADAPTER_PATTERNS)
    projections = _matches(folder, _PROJECTION_PATTERNS)
    if adapters or projections:
        raise ValueError(
            f"model folder {str(folder)!r} holds {adapters + projections} beside the merged weights. Refusing: with peft "
            "installed, transformers re-applies an adapter found in the folder on top of the already merged weights, so "
            "lm-eval would silently score a different model (and projection files mark a training output, not an "
            "export). Evaluate a folder with only config, weights and tokenizer files: move the adapter_* / "
            "projection* files elsewhere (this project writes them to adapters/epoch_N/ and projections/epoch_N/)."
        )
    weights = _matches(folder, _WEIGHT_PATTERNS)
    if not weights:
        raise ValueError(
            f"model folder {str(folder)!r} has no weights (*.safetensors or pytorch_model*.bin): is the export complete?"
        )
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            shards = set(json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise ValueError(f"model folder {str(folder)!r}: {index_name} names missing shards {missing}.")
    if require_tokenizer and not _matches(folder, _TOKENIZER_FILES):
        raise ValueError(
            f"model folder {str(folder)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): copy them in, or pass "
            "the tokenizer folder separately (--tokenizer DIR)."
        )
    if check_weights:
        check_finite_weights(folder)
    return folder


# Elements checked at a time within one tensor: the bool temporaries stay at 16 MiB even for a 128k x 4096
# embedding, whose own copy (read by safetensors) is the peak.
_FINITE_CHECK_BLOCK = 1 << 24


def check_finite_weights(path: Union[str, Path]) -> None:
    """Refuse a model folder whose safetensors weights hold NaN or inf values.

    A run that diverged exports NaN weights that load and score without an error: every answer's log-likelihood is
    NaN, and lm-eval reports 0.0000 ± 0.0000, which reads like a (bad) result. The files are read with
    ``safetensors`` (no pickle), one tensor at a time, so memory stays at the largest tensor; reading stops at the
    first offending tensor. With ``model.safetensors.index.json`` the shards it names are checked, otherwise every
    ``*.safetensors`` file in the folder. ``pytorch_model*.bin`` files are pickles and are not opened here.

    Args:
        path (str | Path): the model folder.

    Raises:
        ValueError: a safetensors file cannot be read (e.g. a git-lfs pointer or a truncated copy), or a
            floating-point tensor holds a NaN or inf; the message names the folder, the file and the tensor.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    folder = Path(path).expanduser().resolve()
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {}).values()))
    else:
        files = _matches(folder, ("*.safetensors",))
    for file_name in files:
        try:
            with safe_open(str(folder / file_name), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if not (tensor.is_floating_point() or tensor.is_complex()):
                        continue
                    flat = tensor.reshape(-1)
                    bad = sum(
                        int(torch.isfinite(block).logical_not_().sum()) for block in flat.split(_FINITE_CHECK_BLOCK)
                    )
                    if bad:
                        raise ValueError(
                            f"model folder {str(folder)!r}: {file_name} tensor {name!r} has {bad} non-finite "
                            f"values (NaN/inf) out of {flat.numel()}: the run diverged (or the export is corrupt); "
                            "evaluate an earlier checkpoint."
                        )
                    del tensor, flat
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"model folder {str(folder)!r}: {file_name} cannot be read as safetensors ({err}): is the copy "
                "complete (not a git-lfs pointer or a truncated download)?"
            ) from err


def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """Parse ``NAME=DIR`` (or bare ``DIR``) command-line model specs, keeping their order.

    A bare ``DIR`` is named after the folder, or ``<parent>_<folder>`` for torchtune's ``epoch_N`` folders.

    Args:
        specs (Sequence[str]): e.g. ``["student=/ckpt/student", "kd=/runs/kd/epoch_0"]``.

    Returns:
        dict[str, Path]: name -> folder (not yet validated).

    Raises:
        ValueError: no spec, an empty or unsafe name, or a duplicated name.
    """
    if not specs:
        raise ValueError("no model given: pass at least one --model NAME=DIR.")
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder = spec
            path = Path(spec).expanduser().resolve()
            name = f"{path.parent.name}_{path.name}" if re.fullmatch(r"epoch_\d+", path.name) else path.name
        if not folder:
            raise ValueError(f"--model {spec!r} has no folder: write NAME=DIR.")
        if not _MODEL_NAME_RE.match(name):
            raise ValueError(
                f"--model {spec!r}: name {name!r} must start with a letter or digit and use only letters, digits, "
                "'.', '_' or '-' (it names the output sub-folder)."
            )
        if name in models:
            raise ValueError(f"--model name {name!r} is given twice: names must be unique.")
        models[name] = Path(folder).expanduser()
    return models


# --------------------------------------------------------------------------------------------- running lm-eval
def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """Map ``auto`` to float32 on CPU (bf16 matmuls are ~100x slower there) and bfloat16 on accelerators."""
    allowed = ("auto", "float32", "bfloat16", "float16")
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not one of {allowed}.")
    if dtype != "auto":
        return dtype
    return "float32" if device.startswith("cpu") else "bfloat16"


def set_offline_env() -> None:
    """Make huggingface_hub, datasets and transformers refuse network access.

    These libraries read the variables when first imported: call this before importing lm_eval (the scripts do).
    """
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"


def json_ready(obj: Any) -> Any:
    """Round-trip lm-eval output through JSON the way lm-eval's own CLI writes it (numpy scalars -> numbers)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def run_lm_eval(
    model_dir: Union[str, Path],
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    include_path: Optional[Union[str, Path]] = None,
    limit: Optional[Union[int, float]] = None,
    num_fewshot: Optional[int] = None,
    batch_size: Union[int, str] = 1,
    device: Optional[str] = None,
    dtype: str = "auto",
    seed: int = 1234,
    tokenizer: Optional[Union[str, Path]] = None,
    log_samples: bool = False,
    check_weights: bool = True,
) -> dict[str, Any]:
    """Evaluate one Hugging Face model folder with ``lm_eval.simple_evaluate(model="hf", ...)``.

    With ``include_path`` (offline stand-ins), the task index is checked before anything runs: every requested
    task must come from a YAML in that folder, so a YAML lm-eval failed to parse (it skips those silently) cannot
    quietly fall back to the hub-backed built-in task.

    Args:
        model_dir (str | Path): a folder accepted by :func:`validate_model_dir`.
        tasks (Sequence[str]): lm-eval task names.
        include_path (str | Path | None): folder of task YAMLs overriding the built-in ones (offline data).
        limit (int | float | None): documents per task (lm-eval's ``limit``; for smoke tests only).
        num_fewshot (int | None): few-shot examples; None keeps each task's default.
        batch_size (int | str): lm-eval batch size (``"auto"`` allowed).
        device (str | None): torch device; None picks :func:`default_device`.
        dtype (str): ``auto`` | ``float32`` | ``bfloat16`` | ``float16`` (see :func:`resolve_dtype`).
        seed (int): every lm-eval seed (python, numpy, torch, few-shot sampling).
        tokenizer (str | Path | None): tokenizer folder when the model folder has none.
        log_samples (bool): keep lm-eval's per-document ``samples`` in the returned dict.
        check_weights (bool): refuse NaN/inf weights first (:func:`check_finite_weights`); False when the folder
            was just checked (as :func:`evaluate_models` does). Default True.

    Returns:
        dict[str, Any]: lm-eval's results dict, JSON-ready (``results``, ``n-samples``, ``n-shot``, ``config`` ...).

    Raises:
        ValueError: a bad folder or argument, or a task not overridden by ``include_path``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = validate_model_dir(model_dir, require_tokenizer=tokenizer is None, check_weights=check_weights)
    if not tasks:
        raise ValueError("tasks is empty: name at least one lm-eval task.")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive (or None for every document).")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} must be >= 0.")
    device = device or default_device()
    model_args: dict[str, Any] = {"pretrained": str(folder), "dtype": resolve_dtype(dtype, device)}
    if tokenizer is not None:
        model_args["tokenizer"] = str(Path(tokenizer).expanduser().resolve())

    if include_path is None:
        manager = TaskManager()
    else:
        # Offline, the index holds only our YAMLs (they include lm-eval's by absolute path): a task we did not
        # override cannot fall back to its hub-backed original, and indexing lm-eval's ~15k built-in YAMLs
        # (~25 s on 2 CPU cores) is skipped.
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        root = Path(include_path).resolve()
        for task in tasks:
            entry = manager.task_index.get(task)
            source = Path(entry.yaml_path).resolve() if entry is not None and entry.yaml_path else None
            if source is None or root not in source.parents:
                raise ValueError(
                    f"task {task!r} would load from {source} instead of the offline YAMLs in {root}: regenerate them "
                    "with write_offline_task_yamls (lm-eval skips YAMLs it cannot parse without an error)."
                )

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=log_samples,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results (run single-process).")
    return json_ready(results)


# --------------------------------------------------------------------------------------------- comparison table
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
    (offline stand-ins vs the real datasets, as recorded by :func:`evaluate_models` under ``"torchtune_kd"``).

    Args:
        results_by_model (Mapping[str, Mapping]): model name -> lm-eval results dict, in display order.
        baseline (str | None): model the deltas are taken against; None means the first model.
        tasks (Sequence[str] | None): tasks to report; None means the first model's tasks in
            :data:`DEFAULT_TASKS` order, then any others alphabetically.

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


def evaluate_models(
    models: Mapping[str, Union[str, Path]],
    output_dir: Union[str, Path],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    baseline: Optional[str] = None,
    data: str = "offline",
    data_dir: Union[str, Path] = OFFLINE_DATA_DIR,
    check_weights: bool = True,
    **run_kwargs: Any,
) -> tuple[dict[str, dict[str, Any]], list[ComparisonRow]]:
    """Evaluate several model folders and write ``<output_dir>/<name>/results.json`` and the comparison files.

    Every folder is validated (weights included: no NaN/inf) before the first evaluation starts, so a bad folder
    fails in seconds, not after hours of scoring the others.

    Args:
        models (Mapping[str, str | Path]): name -> model folder, in table order.
        output_dir (str | Path): where results and ``comparison.md`` / ``comparison.csv`` go.
        tasks (Sequence[str]): lm-eval task names.
        baseline (str | None): the model the deltas refer to (None: the first).
        data (str): ``offline`` (the project's stand-in files; hub access switched off) or ``online`` (the real
            datasets from the hub).
        data_dir (str | Path): the offline data folder.
        check_weights (bool): refuse folders with NaN/inf weights (:func:`check_finite_weights`). Default True.
        **run_kwargs: passed to :func:`run_lm_eval` (``limit``, ``num_fewshot``, ``batch_size``, ``device``,
            ``dtype``, ``seed``, ``tokenizer``, ``log_samples``). With ``log_samples=True`` lm-eval's per-document
            records go to ``<output_dir>/<name>/samples_<task>.jsonl``.

    Returns:
        tuple[dict, list[ComparisonRow]]: results per model and the comparison rows.

    Raises:
        ValueError: a bad argument or model folder.
    """
    if data not in ("offline", "online"):
        raise ValueError(f"data={data!r} must be 'offline' (local stand-in files) or 'online' (the real datasets).")
    if not models:
        raise ValueError("models is empty: pass at least one NAME=DIR.")
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline={baseline!r} is not one of the models {list(models)}.")
    require_tokenizer = run_kwargs.get("tokenizer") is None
    folders = {
        name: validate_model_dir(path, require_tokenizer=require_tokenizer, check_weights=check_weights)
        for name, path in models.items()
    }
    output_dir = Path(output_dir)
    include_path = None
    if data == "offline":
        set_offline_env()
        include_path = output_dir / "lm_eval_tasks"
        write_offline_task_yamls(include_path, tasks, data_dir)
    else:
        blocked = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(k, "").lower() in ("1", "true", "yes", "on")]
        if blocked:
            raise ValueError(
                f"data='online' downloads the real datasets but {', '.join(f'{k}=1' for k in blocked)} is set: unset "
                "it (e.g. `env -u HF_HUB_OFFLINE -u HF_DATASETS_OFFLINE ...`) or use data='offline' (--data offline)."
            )

    import gc

    all_results: dict[str, dict[str, Any]] = {}
    for name, folder in folders.items():
        # Weights were checked above; a second pass over every file would only double the start-up time.
        results = run_lm_eval(folder, tasks, include_path=include_path, check_weights=False, **run_kwargs)
        results["torchtune_kd"] = {
            "name": name,
            "model_dir": str(folder),
            "data": data,
            "data_dir": str(Path(data_dir).resolve()) if data == "offline" else None,
            "tasks": list(tasks),
        }
        (output_dir / name).mkdir(parents=True, exist_ok=True)
        # Per-document records go to their own files: results.json stays the small aggregate lm-eval's CLI writes.
        for task, records in (results.pop("samples", None) or {}).items():
            with open(output_dir / name / f"samples_{task}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        (output_dir / name / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        all_results[name] = results
        # Free this model before the next one loads (lm-eval keeps no reference once simple_evaluate returns).
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    baseline = baseline or next(iter(models))
    rows = build_comparison(all_results, baseline, tasks)
    note = (
        f"Data: offline stand-ins (`data/lm_eval/`, written by this project) — NOT the real benchmarks; only for "
        "checking the pipeline." if data == "offline" else "Data: the real datasets (Hugging Face hub)."
    )
    (output_dir / "comparison.md").write_text(comparison_markdown(rows, baseline, note=note), encoding="utf-8")
    (output_dir / "comparison.csv").write_text(comparison_csv(rows, baseline), encoding="utf-8")
    return all_results, rows


# --------------------------------------------------------------------------------------------- run logs and plots
_LOG_LINE_RE = re.compile(r"^Step\s+(\d+)\s*\|\s*(.*)$")
_TENSOR_RE = re.compile(r"^tensor\((.*?)(?:,.*)?\)$")


def _parse_value(text: str) -> Optional[float]:
    match = _TENSOR_RE.match(text)  # a metric logged as a 0-d tensor prints as tensor(1.23[, device=...])
    try:
        return float(match.group(1) if match else text)
    except ValueError:
        return None


def parse_disk_log(path: Union[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """Parse a torchtune ``DiskLogger`` file into ``{metric: [(step, value), ...]}``.

    DiskLogger writes ``Step N | name:value name:value `` per ``log_dict`` call and ``Step N | name:value`` per
    ``log`` call. Names may contain ``/`` (``weight/ce``, ``ir_loss/0-1``); the value is what follows the *last*
    ``:`` of a token. Non-numeric values and unrelated lines are skipped. A step logged twice (e.g. after a resume
    into the same file) keeps its last value; each series is sorted by step.

    Args:
        path (str | Path): the ``log_*.txt`` file.

    Returns:
        dict[str, list[tuple[int, float]]]: metric -> (step, value) pairs in step order.

    Raises:
        ValueError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"log file {str(path)!r} does not exist.")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LOG_LINE_RE.match(line.strip())
        if not match:
            continue
        step = int(match.group(1))
        for token in match.group(2).split():
            name, sep, raw = token.rpartition(":")
            value = _parse_value(raw) if sep and name else None
            if value is not None:
                series.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in series.items()}


def read_run_logs(path: Union[str, Path]) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """Read a run's metrics from a log file, a ``logs/`` folder or a run's output folder.

    All ``log_*.txt`` files of a folder (one per launch, e.g. after resuming) are merged in file-name order
    (DiskLogger names them by Unix time), later files winning for repeated steps.

    Args:
        path (str | Path): ``.../run/logs/log_123.txt``, ``.../run/logs`` or ``.../run``.

    Returns:
        tuple[str, dict]: the run's label (its output folder name) and its metrics.

    Raises:
        ValueError: the path does not exist or holds no log files.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
        run_dir = path.parent.parent if path.parent.name == "logs" else path.parent
    elif path.is_dir():
        logs = path / "logs" if (path / "logs").is_dir() else path
        files = sorted(logs.glob("log_*.txt"))
        run_dir = logs.parent if logs.name == "logs" else logs
        if not files:
            raise ValueError(f"{str(path)!r} holds no log_*.txt files (looked in {str(logs)!r}).")
    else:
        raise ValueError(f"run log {str(path)!r} does not exist.")
    merged: dict[str, dict[int, float]] = {}
    for file in files:
        for name, points in parse_disk_log(file).items():
            merged.setdefault(name, {}).update(points)
    return run_dir.name, {name: sorted(points.items()) for name, points in merged.items()}


PLOT_METRICS: tuple[str, ...] = ("loss", "ce_loss", "kd_loss", "ir_loss", "weight/*", "grad_norm")
_LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")


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
) -> list[str]:
    """Draw each selected metric against the step in its own subplot, one line per run; save a PNG.

    Runs are told apart by colour (single-metric panels, legend when several runs) or by line style (grouped
    ``prefix/*`` panels, where colour tells the metrics apart).

    Args:
        runs (Mapping[str, Mapping]): run label -> ``{metric: [(step, value)]}`` (from :func:`read_run_logs`).
        out (str | Path): the PNG path (parent folders are created).
        metrics (Sequence[str]): metric names or ``prefix/*`` patterns (see :func:`select_plot_panels`).
        title (str | None): figure title.

    Returns:
        list[str]: the metric names drawn, panel by panel.

    Raises:
        ValueError: no runs, or none of the metrics is present in any run.
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [name for _, names in panels for name in names]
