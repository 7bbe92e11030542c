"""Evaluate exported Hugging Face model folders with lm-eval and write the comparison of several models.

All without torchtune's ``eleuther_eval`` recipe (torchtune 0.6.1 compares lm-eval versions as strings, rejects
0.4.10+, and builds ``HFLM(pretrained="gpt2")``, which needs the hub):

* :func:`validate_model_dir` refuses folders lm-eval would load wrongly (adapter or projection files beside merged
  weights) or score meaninglessly (NaN/inf weights of a diverged run, found by :func:`check_finite_weights`);
* :func:`parse_model_specs` reads the command line's ``NAME=DIR`` specs; :func:`default_device`,
  :func:`resolve_dtype` and :func:`set_offline_env` pick the device, dtype and hub access;
* :func:`run_lm_eval` calls ``lm_eval.simple_evaluate`` on one folder, and :func:`evaluate_models` evaluates several
  (on the offline task files of :mod:`~torchtune_kd.evaluation.lm_eval_tasks` or the real datasets) and writes
  ``results.json`` per model plus the comparison table of :mod:`~torchtune_kd.evaluation.tables`.

Neither torch nor lm_eval is imported at module level (``scripts/evaluate.py`` sets the offline variables first).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from torchtune_kd import output_folder
from torchtune_kd.evaluation.lm_eval_tasks import DEFAULT_TASKS, OFFLINE_DATA_DIR, write_offline_task_yamls
from torchtune_kd.evaluation.tables import ComparisonRow, build_comparison, comparison_csv, comparison_markdown

# Files whose presence beside merged weights makes a folder unsafe to evaluate. With peft installed,
# transformers 5 applies an adapter found in the folder *on top of* the already merged weights, so lm-eval
# would silently score a different model; projection files mean the folder is a training output, not an export.
_ADAPTER_PATTERNS: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "adapter_*.pt")
_PROJECTION_PATTERNS: tuple[str, ...] = ("projection*.pt", "projection*.safetensors", "projection*.bin")
_WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The owner (output_folder's marker) of a folder evaluate_models claims itself (a caller may pass its own), and the
# entries it writes there besides one folder per model.
OWNER = "torchtune_kd.evaluation.lm_eval_runner"
_OWN_ENTRIES: tuple[str, ...] = ("comparison.md", "comparison.csv", "lm_eval_tasks")


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


# --------------------------------------------------------------------------------------------- several models
def evaluate_models(
    models: Mapping[str, Union[str, Path]],
    output_dir: Union[str, Path, output_folder.OwnedFolder],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    baseline: Optional[str] = None,
    data: str = "offline",
    data_dir: Union[str, Path] = OFFLINE_DATA_DIR,
    check_weights: bool = True,
    owner: str = OWNER,
    option: str = "output_dir",
    **run_kwargs: Any,
) -> tuple[dict[str, dict[str, Any]], list[ComparisonRow]]:
    """Evaluate several model folders and write ``<output_dir>/<name>/results.json`` and the comparison files.

    Every folder is validated (weights included: no NaN/inf) before the first evaluation starts, so a bad folder
    fails in seconds, not after hours of scoring the others. The output folder follows
    :mod:`torchtune_kd.output_folder`: checked before that (nothing is created when a model folder is refused), then
    claimed with every entry written there (``comparison.md``, ``comparison.csv``, ``lm_eval_tasks/`` and one folder
    per model) before lm-eval starts. A folder or file this function did not write is refused, never replaced; a
    model's folder from an earlier evaluation here is replaced by the new one.

    Args:
        models (Mapping[str, str | Path]): name -> model folder, in table order.
        output_dir (str | Path | OwnedFolder): where results and ``comparison.md`` / ``comparison.csv`` go: a path
            (claimed for ``owner``, so a folder holding other files is refused) or the caller's own claimed folder.
        tasks (Sequence[str]): lm-eval task names.
        baseline (str | None): the model the deltas refer to (None: the first).
        data (str): ``offline`` (the project's stand-in files; hub access switched off) or ``online`` (the real
            datasets from the hub).
        data_dir (str | Path): the offline data folder.
        check_weights (bool): refuse folders with NaN/inf weights (:func:`check_finite_weights`). Default True.
        owner (str): the command writing, recorded in the folder's marker when ``output_dir`` is a path (default
            :data:`OWNER`; e.g. ``"scripts/evaluate.py"``).
        option (str): how the user named ``output_dir`` (e.g. ``"--output-dir"``), quoted in a refusal.
        **run_kwargs: passed to :func:`run_lm_eval` (``limit``, ``num_fewshot``, ``batch_size``, ``device``,
            ``dtype``, ``seed``, ``tokenizer``, ``log_samples``). With ``log_samples=True`` lm-eval's per-document
            records go to ``<output_dir>/<name>/samples_<task>.jsonl``.

    Returns:
        tuple[dict, list[ComparisonRow]]: results per model and the comparison rows.

    Raises:
        ValueError: a bad argument or model folder.
        output_folder.OutputFolderError: the output folder, or an entry in it, is not this evaluation's to write.
    """
    if data not in ("offline", "online"):
        raise ValueError(f"data={data!r} must be 'offline' (local stand-in files) or 'online' (the real datasets).")
    if not models:
        raise ValueError("models is empty: pass at least one NAME=DIR.")
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline={baseline!r} is not one of the models {list(models)}.")
    clashing = [name for name in models if name in _OWN_ENTRIES]
    if clashing:
        raise ValueError(f"model name {clashing[0]!r} is the name of a file the comparison writes: choose another name.")
    # Checked before the model folders are validated (every weight is read), claimed after (a refused model leaves
    # no folder behind) and before lm-eval runs.
    out = output_dir if isinstance(output_dir, output_folder.OwnedFolder) else None
    if out is None:
        problems = output_folder.check(output_dir, owner=owner, option=option)
        if problems:
            raise output_folder.OutputFolderError(problems[0])
    require_tokenizer = run_kwargs.get("tokenizer") is None
    folders = {
        name: validate_model_dir(path, require_tokenizer=require_tokenizer, check_weights=check_weights)
        for name, path in models.items()
    }
    if out is None:
        out = output_folder.claim_output_folder(output_dir, owner=owner, option=option)
    out.claim("comparison.md", "comparison.csv", *(["lm_eval_tasks"] if data == "offline" else []), *models)
    output_dir = out.path
    include_path = None
    if data == "offline":
        set_offline_env()
        # Fresh each time: YAMLs of tasks an earlier evaluation here asked for would otherwise stay beside them.
        out.remove("lm_eval_tasks")
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
        # An earlier evaluation's folder of this name (its samples files included) is replaced as a whole.
        out.remove(name)
        (output_dir / name).mkdir(parents=True)
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
        "Data: offline stand-ins (`torchtune_kd/evaluation/task_data/`, written by this project) — NOT the real "
        "benchmarks; only for checking the pipeline."
        if data == "offline"
        else "Data: the real datasets (Hugging Face hub)."
    )
    (output_dir / "comparison.md").write_text(comparison_markdown(rows, baseline, note=note), encoding="utf-8")
    (output_dir / "comparison.csv").write_text(comparison_csv(rows, baseline), encoding="utf-8")
    return all_results, rows

