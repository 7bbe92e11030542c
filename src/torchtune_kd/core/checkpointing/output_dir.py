"""The recipes' output folder (``output_dir``): what a run may write there, and what it must never touch.

The folder follows the shared output-folder rule (:mod:`torchtune_kd.output_folder`, owner :data:`OWNER`, shared by
both recipes): a run claims ``output_dir`` before any model is built and records every top-level entry in the marker
*before* writing it; what is the run's is decided by the marker only, never by a name. So
``overwrite_output_dir=True`` deletes only entries the recipes wrote (a user's ``epoch_0/`` or ``notes.txt`` is never
touched, and a folder holding a user's entry that a run would write is refused, naming it). A new run refuses a
folder that already holds another run's outputs (unless it resumes, or the user asks to overwrite), resume needs a
folder the recipes wrote, and no path a run writes or deletes may contain an input (checkpoint, tokenizer, data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from torchtune_kd import output_folder
from torchtune_kd.core.checkpointing.states import TRAINING_STATE_DIR, latest_training_state, list_training_states
from torchtune_kd.errors import CheckpointError, ConfigError

# The owner recorded in the marker: both recipes share it (a run resumes in either).
OWNER = "torchtune-kd recipe"
OPTION = "output_dir"
OVERWRITE_HINT = "overwrite_output_dir=True"
RUN_OUTPUTS = ("adapters", "projections", TRAINING_STATE_DIR)
# Written into output_dir by torchtune.training.metric_logging.save_config (every logger's log_config).
CONFIG_COPY = "torchtune_config.yaml"


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def side_dirs(cfg: Mapping[str, Any]) -> list[str]:
    """The folders a run's components write besides the checkpoints: the metric logger's ``log_dir`` and, when
    profiling, the profiler's ``output_dir`` (by default both inside ``output_dir``)."""
    found = []
    logger = cfg.get("metric_logger")
    if isinstance(logger, Mapping) and logger.get("log_dir"):
        found.append(str(logger["log_dir"]))
    profiler = cfg.get("profiler")
    if isinstance(profiler, Mapping) and profiler.get("enabled", False) is True and profiler.get("output_dir"):
        found.append(str(profiler["output_dir"]))
    return found


def side_entries(output_dir: Path, folders: Iterable[Any]) -> list[str]:
    """The top-level entries of ``output_dir`` that a run's components write besides the checkpoints: always
    torchtune's copy of the config (its metric loggers' ``log_config`` saves ``output_dir/torchtune_config.yaml``),
    and those that hold ``folders`` (``logs`` for ``output_dir/logs``); folders elsewhere (or ``output_dir`` itself)
    have none."""
    outer = Path(output_dir).expanduser().absolute()
    entries = [CONFIG_COPY]
    for folder in folders:
        try:
            relative = Path(str(folder)).expanduser().absolute().relative_to(outer)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] not in (".", "..") and relative.parts[0] not in entries:
            entries.append(relative.parts[0])
    return entries


def run_entries(epochs: int, side: Iterable[str] = ()) -> list[str]:
    """The top-level entries of ``output_dir`` a run of ``epochs`` epochs may write (and so replace), with the
    ``side`` entries of :func:`side_entries`."""
    names = [f"epoch_{epoch}" for epoch in range(epochs)] + list(RUN_OUTPUTS)
    return names + [name for name in side if name not in names]


def written_paths(output_dir: Path, epochs: int, side: Iterable[str] = ()) -> list[Path]:
    """Every path a run writes into or may replace (and so may delete an older version of)."""
    return [Path(output_dir) / name for name in run_entries(epochs, side)]


def previous_run_outputs(output_dir: Path, owned: Iterable[str], ignore: Iterable[str] = ()) -> list[Path]:
    """The outputs an earlier run left among the ``owned`` entries (those the marker lists) of ``output_dir``.

    A folder without content does not count, nor ``training_state/`` without a complete state (a run that died
    before its first save left nothing to lose), nor the ``ignore`` entries (the metric logger's folder: a new run
    adds its own log file beside the old ones).
    """
    output_dir = Path(output_dir)
    skipped = set(ignore)
    found = []
    for name in sorted(set(owned) - skipped):
        path = output_dir / name
        if name == TRAINING_STATE_DIR:
            if list_training_states(output_dir):
                found.append(path)
        elif path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                found.append(path)
        elif os.path.lexists(path):
            found.append(path)
    return found


def check_output_dir(
    output_dir: Path,
    *,
    epochs: int,
    resume: bool,
    overwrite: bool,
    inputs: Mapping[str, Path],
    side: Iterable[Any] = (),
) -> list[str]:
    """Problems with writing a run into ``output_dir``, each naming the path and the fix (empty list: fine).

    Writes nothing. The folder must be new, empty or the recipes' own (its marker); ``overwrite`` adopts a folder
    holding other files, which stay untouched, unless one of them has the name of an entry the run writes (a user's
    ``epoch_0/``): that is refused whatever the flags.

    Args:
        output_dir (Path): the run's output folder.
        epochs (int): number of epochs (each writes ``epoch_{N}/``).
        resume (bool): ``resume_from_checkpoint``: the folder must be one the recipes wrote.
        overwrite (bool): ``overwrite_output_dir``: the user asked to replace an earlier run's outputs (only the
            entries the recipes wrote are deleted) or to write beside files the recipes did not write.
        inputs (Mapping[str, Path]): config key -> input path (checkpoint folders, tokenizer and data files); none
            of them may lie where the run writes, with or without ``overwrite``.
        side (Iterable[Any]): the folders the run's components write (:func:`side_dirs`); inside ``output_dir``
            their top-level entries are the run's too.
    """
    output_dir = Path(output_dir)
    shown = f"{OPTION}={str(output_dir)!r}"
    extra = side_entries(output_dir, side)
    problems = []
    for key, path in inputs.items():
        for target in written_paths(output_dir, epochs, extra):
            if _contains(target, Path(path)):
                problems.append(
                    f"{key}={str(path)!r} lies inside {str(target)!r}, which this run writes (and would replace): "
                    "point output_dir elsewhere or move the input out of it"
                )
                break
    report = output_folder.inspect(output_dir)
    if not report.exists or not report.is_dir or report.bad_marker or report.owner not in (None, OWNER):
        # A file, an unreadable marker, another command's folder: the shared rule's own message.
        return problems + output_folder.check(output_dir, owner=OWNER, option=OPTION, overwrite=overwrite,
                                              overwrite_hint=OVERWRITE_HINT)
    if resume and report.owner is None and report.foreign:
        problems.append(
            f"resume_from_checkpoint=True but {shown} was not written by {OWNER} (it has no "
            f"{output_folder.MARKER}; it holds {', '.join(report.foreign[:5])}"
            f"{' ...' if len(report.foreign) > 5 else ''}): point output_dir at the run to resume, or start a "
            "new run (a new output_dir)"
        )
        return problems
    clashes = [name for name in run_entries(epochs, extra) if name in report.foreign]
    if clashes:
        problems.append(
            f"{shown} holds {', '.join(clashes)}, which this run writes, but {OWNER} did not write "
            f"{'it' if len(clashes) == 1 else 'them'}: never replaced (with {OVERWRITE_HINT} too); move "
            f"{'it' if len(clashes) == 1 else 'them'} out of the folder, or choose another output_dir"
        )
        return problems
    if resume:
        return problems
    problems += output_folder.check(output_dir, owner=OWNER, option=OPTION, overwrite=overwrite,
                                    overwrite_hint=OVERWRITE_HINT)
    previous = previous_run_outputs(output_dir, report.written, ignore=extra)
    if previous and not overwrite:
        names = ", ".join(p.name for p in previous)
        problems.append(
            f"{shown} already holds another run's outputs ({names}): resume it with "
            f"resume_from_checkpoint=True, choose a new output_dir, or set {OVERWRITE_HINT} to replace them (only "
            f"what {OWNER} wrote there is deleted)"
        )
    return problems


def claim_output_dir(
    output_dir: Path, *, resume: bool, overwrite: bool, side: Iterable[Any] = ()
) -> tuple[output_folder.OwnedFolder, list[Path]]:
    """Make ``output_dir`` the run's (rank 0, before any model is built): claim it, delete an earlier run's
    outputs when ``overwrite`` asks to start afresh (only entries the recipes wrote), and claim the entries of the
    ``side`` folders (:func:`side_dirs`) that lie inside, before their components create them.

    Returns:
        tuple[OwnedFolder, list[Path]]: the claimed folder and what was deleted.

    Raises:
        ConfigError: the folder cannot be written without risking a user's file (see :func:`check_output_dir`,
            which the pre-flight runs first).
    """
    extra = side_entries(output_dir, side)
    try:
        folder = output_folder.claim_output_folder(
            output_dir, owner=OWNER, option=OPTION, overwrite=overwrite and not resume, overwrite_hint=OVERWRITE_HINT
        )
        removed = folder.remove_all() if overwrite and not resume else []
        if extra:
            folder.claim(*extra)
    except output_folder.OutputFolderError as err:
        raise ConfigError([str(err)]) from None
    return folder, removed


def entries_to_claim(epoch: Optional[int], *, lora: bool, adapter_weights_only: bool, projections: bool) -> list[str]:
    """The top-level entries a save writes: the training state always; at an epoch end (``epoch`` given) also
    ``epoch_{N}/`` (not for a LoRA student with ``save_adapter_weights_only``), ``adapters/`` (LoRA) and
    ``projections/`` (when saved)."""
    names = [TRAINING_STATE_DIR]
    if epoch is not None:
        if not (lora and adapter_weights_only):
            names.append(f"epoch_{epoch}")
        if lora:
            names.append("adapters")
        if projections:
            names.append("projections")
    return names


def save_failure(err: BaseException, output_dir: Path, what: str) -> CheckpointError:
    """The error for a save that could not be written (a read-only folder, a full disk, an entry in the way).

    The writes are atomic, so nothing complete was replaced: the message names the newest complete training state
    (still resumable) and the fix.
    """
    try:
        latest = latest_training_state(output_dir)
    except OSError:
        latest = None
    reason = str(err) if isinstance(err, output_folder.OutputFolderError) else f"{type(err).__name__}: {err}"
    if latest is not None:
        kept = (
            f"Nothing saved before was replaced: the newest complete training state, {str(latest.parent)!r}, is "
            "intact. Make output_dir writable again (permissions, free disk space, or move what is in the way), then "
            "rerun the same command with resume_from_checkpoint=True to continue from it."
        )
    else:
        kept = (
            "No training state had been saved before this one. Make output_dir writable again (permissions, free "
            "disk space, or move what is in the way) and start the run again."
        )
    return CheckpointError(f"could not save {what} into {OPTION}={str(output_dir)!r} ({reason}). {kept}")


def config_input_paths(cfg: Mapping[str, Any]) -> dict[str, Path]:
    """Config key -> every local input path a distillation config reads (checkpoints, tokenizer, data files)."""
    paths: dict[str, Path] = {}
    for key in ("checkpointer", "teacher_checkpointer"):
        section = cfg.get(key)
        if isinstance(section, Mapping) and section.get("checkpoint_dir"):
            paths[f"{key}.checkpoint_dir"] = Path(str(section["checkpoint_dir"]))
    tokenizer = cfg.get("tokenizer")
    if isinstance(tokenizer, Mapping):
        for name in ("path", "special_tokens_path", "merges_file"):
            if tokenizer.get(name):
                paths[f"tokenizer.{name}"] = Path(str(tokenizer[name]))
    datasets = cfg.get("dataset")
    sections = list(datasets) if isinstance(datasets, (list, tuple)) or type(datasets).__name__ == "ListConfig" else [datasets]
    for index, section in enumerate(sections):
        if not isinstance(section, Mapping) or section.get("data_files") is None:
            continue
        files = section["data_files"]
        values = list(files.values()) if isinstance(files, Mapping) else list(files) if not isinstance(files, str) else [files]
        where = "dataset" if len(sections) == 1 else f"dataset[{index}]"
        for number, value in enumerate(values):
            if "://" not in str(value):
                paths[f"{where}.data_files" + (f"[{number}]" if len(values) > 1 else "")] = Path(str(value))
    return paths
