"""The offline lm-eval tasks: the project's own task files and the YAMLs that put lm-eval's tasks on them.

:func:`write_offline_task_yamls` writes task YAMLs that ``include:`` lm-eval's *installed* ``hellaswag`` /
``commonsense_qa`` / ``truthfulqa_mc2`` YAMLs and override only the dataset fields (``dataset_path: json`` + the
project's JSONL files). The task names stay the same, so passing the folder as ``include_path`` replaces the built-in
tasks while lm-eval's own prompt building (``process_docs``, ``doc_to_text``) and scoring (``process_results``) run
unchanged.

The JSONL files are package data of ``torchtune_kd.evaluation`` (folder ``task_data/``, provenance in its
``README.md``), found through :mod:`importlib.resources`, so they come along in a wheel install as in a checkout.
This module imports neither torch nor lm_eval at module level (the command-line scripts read its constants first).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from torchtune_kd import output_folder

DEFAULT_TASKS: tuple[str, ...] = ("truthfulqa_mc2", "hellaswag", "commonsense_qa")

# The package that holds the task files and their folder in it (see pyproject.toml's package-data).
_DATA_PACKAGE = "torchtune_kd.evaluation"
_DATA_FOLDER = "task_data"
# The owner (output_folder's marker) of a folder write_offline_task_yamls claims itself (a caller may pass its own).
OWNER = "torchtune_kd.evaluation.lm_eval_tasks"


def offline_data_dir() -> Path:
    """The folder of the project's offline task files, inside the installed ``torchtune_kd.evaluation`` package.

    Returns:
        Path: the resolved ``task_data`` folder (holding ``<task folder>/<split>.jsonl`` and ``README.md``).
    """
    # lm-eval hands these files to datasets' `json` builder by path, so they must be plain files on disk: every
    # ordinary install (wheel, editable, checkout) gives a pathlib.Path here. A zipped package would give a path
    # that does not exist, and write_offline_task_yamls then names the missing file.
    return Path(str(files(_DATA_PACKAGE) / _DATA_FOLDER)).resolve()


OFFLINE_DATA_DIR: Path = offline_data_dir()


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


def lm_eval_tasks_dir() -> Path:
    """The installed ``lm_eval/tasks`` folder (found from the package, never hard-coded)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def write_offline_task_yamls(
    out_dir: Union[str, Path, output_folder.OwnedFolder],
    tasks: Sequence[str] = DEFAULT_TASKS,
    data_dir: Union[str, Path] = OFFLINE_DATA_DIR,
) -> dict[str, Path]:
    """Write one YAML per task that includes lm-eval's own task YAML and points it at local JSONL files.

    Only ``dataset_path``, ``dataset_name``, ``dataset_kwargs`` and the split fields are overridden; the task name
    is kept, so ``--include_path out_dir`` (or ``TaskManager(include_path=out_dir)``) shadows the built-in task.
    Every ``!function`` reference of the included YAMLs is resolved once here (relative to the *included* file, as
    lm-eval does), so a broken include fails now rather than silently falling back to the hub-backed task.

    The folder is claimed through :mod:`torchtune_kd.output_folder` and each ``<task>.yaml`` is claimed before it
    is written: a file of that name this function did not write is never replaced, and nothing is deleted.

    Args:
        out_dir (str | Path | OwnedFolder): folder to write ``<task>.yaml`` into: a path (created if missing; claimed
            with owner :data:`OWNER`, so a folder holding other files is refused), or the caller's own claimed folder.
        tasks (Sequence[str]): task names; each must be a key of :data:`OFFLINE_TASKS`.
        data_dir (str | Path): folder holding ``<task folder>/<split>.jsonl`` (default: the packaged
            :data:`OFFLINE_DATA_DIR`).

    Returns:
        dict[str, Path]: task name -> written YAML path.

    Raises:
        ValueError: a task has no local data, a data file or lm-eval's YAML is missing, or an included
            ``!function`` does not resolve.
        output_folder.OutputFolderError: the folder, or a ``<task>.yaml`` in it, is not this writer's to write.
    """
    import yaml

    from lm_eval.tasks._yaml_loader import load_yaml

    data_dir = Path(data_dir).resolve()
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ValueError(
            f"tasks={unknown} have no offline stand-in data (available: {sorted(OFFLINE_TASKS)}); "
            "use data='online' (--data online) for other tasks, or add files under "
            "torchtune_kd/evaluation/task_data/ and an OFFLINE_TASKS entry."
        )
    tasks_dir = lm_eval_tasks_dir()
    if isinstance(out_dir, output_folder.OwnedFolder):
        folder = out_dir
    else:
        folder = output_folder.claim_output_folder(Path(out_dir).resolve(), owner=OWNER, option="out_dir")
    written: dict[str, Path] = {}
    for task in tasks:
        spec = OFFLINE_TASKS[task]
        upstream = tasks_dir / spec.upstream_yaml
        if not upstream.is_file():
            raise ValueError(
                f"lm-eval's YAML for task {task!r} is not at {upstream}: the installed lm-eval layout differs from "
                "0.4.13 (see requirements.txt); update OFFLINE_TASKS in torchtune_kd/evaluation/lm_eval_tasks.py."
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
        path = folder.path_of(f"{task}.yaml").resolve()
        path.write_text(
            "# Generated by lm_eval_tasks.write_offline_task_yamls: lm-eval's own task on the project's local data.\n"
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
