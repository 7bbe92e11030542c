"""Checkpoint I/O for the distillation recipes: nothing lost, nothing unsafe, nothing of the user's deleted.

Layout of an output folder (``output_dir``)::

    .torchtune_kd_outputs.json          the marker: this folder is the recipes', and which entries they wrote
    epoch_{N}/                          the student as a clean Hugging Face model (what lm-eval and transformers load)
    adapters/epoch_{N}/                 LoRA adapter (PEFT format + torchtune's .pt) for LoRA students
    projections/epoch_{N}/projections.pt  learned student->teacher projections
    training_state/step_{S}/recipe_state.pt  everything resume needs, after optimiser step S (mid-epoch or epoch end)
    logs/                               the metric logger's folder (and the profiler's), when inside ``output_dir``

Guarantees:

- the folder follows the shared output-folder rule (:mod:`torchtune_kd.output_folder`, owner :data:`OWNER`, shared
  by both recipes): a run claims ``output_dir`` before any model is built and records every top-level entry in the
  marker *before* writing it; what is the run's is decided by the marker only, never by a name. So
  ``overwrite_output_dir=True`` deletes only entries the recipes wrote (a user's ``epoch_0/`` or ``notes.txt`` is
  never touched, and a folder holding a user's entry that a run would write is refused, naming it), and only the
  temporaries of owned entries are cleaned (inside ``training_state/`` and ``adapters/``, which are the recipes'
  own folders, by this module's temporary names);
- every file and folder is written under a temporary name and moved into place (``os.replace``), so a crash or a
  failed write (permissions, a full disk) leaves the old version or the new one, never half of one; the next save
  removes what an interrupted one left (``.epoch_N.staging``, ``.epoch_N.old``, ``.*.tmp``);
- the training state is loaded with ``torch.load(weights_only=True)``: a crafted file cannot run code, and a
  corrupt or foreign file gets an error naming it;
- a new run refuses an output folder that already holds another run's outputs (unless it resumes, or the user asks
  to overwrite), resume needs a folder the recipes wrote, and no path this module writes or deletes may contain an
  input (checkpoint, tokenizer, data);
- non-finite weights are never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from torchtune_kd import output_folder
from torchtune_kd.errors import CheckpointError  # noqa: F401  (raised here; re-exported for callers)

# The owner recorded in the marker: both recipes share it (a run resumes in either).
OWNER = "torchtune-kd recipe"
OPTION = "output_dir"
OVERWRITE_HINT = "overwrite_output_dir=True"
TRAINING_STATE_DIR = "training_state"
STATE_FILE = "recipe_state.pt"
# Written by earlier versions (one state, overwritten at each epoch end); still resumable.
LEGACY_STATE = Path(TRAINING_STATE_DIR) / STATE_FILE
STATE_FORMAT = 2
RUN_OUTPUTS = ("adapters", "projections", TRAINING_STATE_DIR)
# Written into output_dir by torchtune.training.metric_logging.save_config (every logger's log_config).
CONFIG_COPY = "torchtune_config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Names of this module's own temporaries (see atomic_torch_save, replace_dir, stage_dir).
_LEFTOVER = re.compile(r"^\.(.+\.(old|tmp)|.+\.staging|staging_.+)$")


# --------------------------------------------------------------------------------------------- atomic writing


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_dir(final: Path) -> Path:
    """A fresh, empty staging folder beside ``final`` (its name marks it as this module's temporary)."""
    staged = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one of the same name.

    Between the two renames the old folder is ``.<name>.old``: if the second rename fails (a permission or disk
    error), the old folder is moved back before the error goes on; if the process dies there, the next save removes
    the leftover.
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        try:
            os.replace(staged, final)
        except OSError:
            os.replace(trash, final)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


def clean_leftovers(*folders: Path) -> list[Path]:
    """Remove the temporaries an interrupted save left in ``folders``, by this module's temporary names: only for
    folders that are the recipes' own (``training_state/``, ``adapters/``); at the top of ``output_dir`` only
    :meth:`~torchtune_kd.output_folder.OwnedFolder.remove_temporaries` may delete (the temporaries of owned entries).

    Returns:
        list[Path]: what was removed.
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _LEFTOVER.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def clean_incomplete_states(output_dir: Path) -> list[Path]:
    """Remove ``training_state/step_*`` folders without a state file: saves that died before their final rename."""
    root = Path(output_dir) / TRAINING_STATE_DIR
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if _STEP_DIR.match(entry.name) and entry.is_dir() and not (entry / STATE_FILE).is_file():
                shutil.rmtree(entry)
                removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------ output folder guard


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
            if list_training_states(output_dir) or (output_dir / LEGACY_STATE).is_file():
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
    from torchtune_kd.core.preflight import ConfigError

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


# ----------------------------------------------------------------------------------------------- training state


def state_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / TRAINING_STATE_DIR / f"step_{step}"


def list_training_states(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete training states in ``output_dir``, oldest first, as ``(global_step, file)``."""
    root = Path(output_dir) / TRAINING_STATE_DIR
    states = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            # The file is written atomically, so its presence means the state is complete.
            if match and (entry / STATE_FILE).is_file():
                states.append((int(match.group(1)), entry / STATE_FILE))
    return sorted(states)


def latest_training_state(output_dir: Path) -> Optional[Path]:
    states = list_training_states(output_dir)
    if states:
        return states[-1][1]
    legacy = Path(output_dir) / LEGACY_STATE
    return legacy if legacy.is_file() else None


def save_training_state(state: Mapping[str, Any], output_dir: Path, step: int, keep_last_n: int) -> Path:
    """Write the state of optimiser step ``step`` atomically, then drop all but the newest ``keep_last_n`` states.

    The new state is complete before any older one is removed, so a crash at any point leaves a resumable folder.
    """
    path = state_dir(output_dir, step) / STATE_FILE
    atomic_torch_save({**state, "format": STATE_FORMAT}, path)
    prune_training_states(output_dir, keep_last_n)
    return path


def prune_training_states(output_dir: Path, keep_last_n: int) -> list[Path]:
    """Remove the oldest complete training states beyond ``keep_last_n`` (and a legacy single state)."""
    states = list_training_states(output_dir)
    removed = []
    for _, path in states[: max(len(states) - keep_last_n, 0)]:
        shutil.rmtree(path.parent)
        removed.append(path.parent)
    legacy = Path(output_dir) / LEGACY_STATE
    if states and legacy.is_file():
        legacy.unlink()
        removed.append(legacy)
    return removed


def load_training_state(path: Path, required_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Load a training state without unpickling code (``weights_only=True``).

    Raises:
        CheckpointError: the file is corrupt, holds objects other than tensors and plain containers (possibly
            crafted), or misses keys the recipe needs; the message names the file.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals, truncation and zip errors all land here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot load the training state {str(path)!r} safely ({type(err).__name__}: {reason}). It is corrupt, "
            "not written by this recipe, or holds objects other than tensors and plain containers (never loaded, "
            "as they could run code). Delete this step_* folder to resume from an older one, or start a new run."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} is not a training state written by this recipe (a {type(state).__name__})")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} is not a training state written by this recipe: missing {missing}. Start a new run or "
            "point output_dir at the run to resume."
        )
    return state


# ------------------------------------------------------------------------------------------------- weights


def checkpoint_file_names(key: str, files: Any, problems: list[str]) -> list[str]:
    """The checkpoint file names of ``<key>.checkpoint_files``, torchtune's ``{filename_format, max_filename}`` form
    expanded; a malformed mapping is appended to ``problems`` (naming the key) and gives no names."""
    if isinstance(files, DictConfig):
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        plain = OmegaConf.to_container(files, resolve=True)
        try:
            return list(FormattedCheckpointFiles.from_dict(plain).build_checkpoint_filenames())
        except (KeyError, TypeError, ValueError) as err:  # torchtune's own message says which field is wrong
            problems.append(
                f"{key}.checkpoint_files={plain!r} is not a valid {{filename_format, max_filename}} mapping: "
                f"{str(err)[:200]}"
            )
            return []
    return [str(name) for name in (files or [])]


def cpu_copy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies: never views of the live model (on CPU ``t.cpu()`` is ``t`` itself, and torchtune's
    ``get_merged_lora_ckpt`` adds adapters into the base weights in place)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """``(name, count)`` of the floating-point tensors holding NaN or inf."""
    bad = []
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append((name, count))
    return bad


def require_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    bad = non_finite_tensors(state_dict)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in bad[:5])
        raise CheckpointError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold NaN/inf values, e.g. {listed}. The run diverged; "
            "resume from the last good checkpoint with a lower learning rate."
        )


def export_hf(
    checkpointer: Any,
    state_dict: Mapping[str, torch.Tensor],
    output_dir: Path,
    epoch: int,
    model_key: str = "model",
) -> Path:
    """Write ``output_dir/epoch_{N}`` as a clean Hugging Face model folder through torchtune's checkpointer.

    The checkpointer writes ``<its output dir>/epoch_{N}``: pointing it at a staging folder makes the export
    atomic. It also copies every non-weight file of the source folder; adapter files there would make transformers
    (with peft) apply an adapter on top of merged weights, so they never go into an export.
    """
    final_dir = Path(output_dir) / f"epoch_{epoch}"
    staging = stage_dir(final_dir)
    original_output_dir = checkpointer._output_dir
    checkpointer._output_dir = staging
    try:
        checkpointer.save_checkpoint({model_key: dict(state_dict)}, epoch=epoch, intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = original_output_dir
    staged = staging / f"epoch_{epoch}"
    for leftover in list(staged.glob("adapter_*")):
        leftover.unlink()
    replace_dir(staged, final_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return final_dir


def save_peft_adapter(
    adapter_state: Mapping[str, torch.Tensor],
    final_dir: Path,
    *,
    hf_config: Mapping[str, Any],
    rank: int,
    alpha: float,
    target_modules: list[str],
    base_model: Optional[str],
) -> Path:
    """The LoRA adapter in PEFT format (+ torchtune's ``.pt``) in its own folder, never beside merged weights."""
    from safetensors.torch import save_file
    from torchtune.models import convert_weights

    adapter_config = convert_weights.tune_to_peft_adapter_config(
        adapter_config={"r": rank, "lora_alpha": alpha, "target_modules": target_modules, "peft_type": "LORA"},
        base_model_name_or_path=base_model,
    )
    peft_weights = convert_weights.tune_to_peft_adapter_weights(
        dict(adapter_state),
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim", None),
    )
    staged = stage_dir(Path(final_dir))
    torch.save(dict(adapter_state), staged / "adapter_model.pt")
    save_file({k: v.contiguous() for k, v in peft_weights.items()}, staged / "adapter_model.safetensors", metadata={"format": "pt"})
    (staged / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    replace_dir(staged, Path(final_dir))
    return Path(final_dir)


def save_projections(pairs: list, state_dict: Mapping[str, torch.Tensor], final_file: Path) -> Path:
    atomic_torch_save({"pairs": [list(p) for p in pairs], "state_dict": dict(state_dict)}, final_file)
    return final_file


def describe_change(name: str, saved: Any, current: Any, *, used: str) -> Optional[str]:
    """A warning line when a setting differs between the checkpoint and the config (``None`` when equal)."""
    if saved == current:
        return None
    return f"{name} changed since the checkpoint ({saved!r} -> {current!r}): {used}"



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


# ------------------------------------------------------------------------------------------- recipe-level saves


@dataclass
class LoraSpec:
    """What exporting a LoRA student needs: its rank/alpha (to merge) and where the adapters sit (PEFT config)."""

    rank: int
    alpha: float
    attn_modules: list[str]
    apply_to_mlp: bool
    apply_to_output: bool


def save_student(
    checkpointer: Any,
    model_state: Mapping[str, torch.Tensor],
    output_dir: Path,
    epoch: int,
    *,
    lora: Optional[LoraSpec],
    adapter_weights_only: bool = False,
) -> None:
    """The epoch's student exports: ``epoch_{N}/`` (merged when LoRA) and, for LoRA, ``adapters/epoch_{N}/``.

    ``model_state`` must be a copy (:func:`cpu_copy`): merging adds the adapters into its base weights in place.
    """
    from torchtune import training
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

    if lora is None:
        export_hf(checkpointer, model_state, output_dir, epoch, training.MODEL_KEY)
        return
    adapter_state = get_adapter_state_dict(dict(model_state))
    if not adapter_weights_only:
        merged = get_merged_lora_ckpt(dict(model_state), rank=lora.rank, alpha=lora.alpha)
        export_hf(checkpointer, merged, output_dir, epoch, training.MODEL_KEY)
    save_peft_adapter(
        adapter_state,
        Path(output_dir) / "adapters" / f"epoch_{epoch}",
        hf_config=checkpointer._config,
        rank=lora.rank,
        alpha=lora.alpha,
        target_modules=get_lora_module_names(lora.attn_modules, lora.apply_to_mlp, lora.apply_to_output),
        base_model=getattr(checkpointer, "repo_id", None),
    )


def load_latest_training_state(output_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest complete training state of ``output_dir`` and its file, loaded without unpickling code.

    Raises:
        ConfigError: there is no training state to resume.
        CheckpointError: the state cannot be loaded safely.
    """
    from torchtune_kd.core.preflight import ConfigError

    path = latest_training_state(output_dir)
    if path is None:
        raise ConfigError(
            [
                f"resume_from_checkpoint=True but {str(Path(output_dir) / TRAINING_STATE_DIR)!r} holds no training "
                "state: run without resuming first, or point output_dir at the run to resume"
            ]
        )
    state = load_training_state(path, required_keys=("seed", "epochs_run", "global_step", "optimizer", "trainable"))
    return state, path


def peek_training_state(output_dir: Path) -> Optional[tuple[dict[str, Any], Path]]:
    """The newest training state of ``output_dir`` and its file, read cheaply for the pre-flight: memory-mapped (no
    tensor data is read) and without unpickling code (``weights_only=True``). ``None`` when there is none or it
    cannot be read this way (the recipe then loads it and reports why)."""
    path = latest_training_state(output_dir)
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # corrupt, crafted or foreign: load_training_state says which, with the fix
        return None
    return (state, path) if isinstance(state, dict) else None


def _scaling_setting(method: str) -> str:
    """How a weighting method is set in the config (``blend`` is ``loss_scaling.enabled=false``)."""
    if method == "blend":
        return "loss_scaling.enabled=false (the kd_ratio blend)"
    return f"loss_scaling.method={method}"


def loss_scaling_problem(state: Mapping[str, Any], path: Path, method: str) -> Optional[str]:
    """Refusal of a resume whose loss-scaling method (``blend``, ``manual`` or ``dynamic``) differs from the one the
    training state was trained with: its statistics and the meaning of its loss belong to that method."""
    saved = state.get("loss_scaling")
    saved = saved.get("method") if isinstance(saved, Mapping) else None
    if saved is None or saved == method:
        return None
    return (
        f"resume_from_checkpoint=True with {_scaling_setting(method)}, but the training state {str(path)!r} was "
        f"trained with {_scaling_setting(saved)}: its loss-scaling statistics belong to that method. Resume with "
        f"{_scaling_setting(saved)}, or start a new run (a new output_dir) to use {_scaling_setting(method)}"
    )


def global_batch_problem(
    state: Mapping[str, Any], path: Path, *, batch_size: int, gradient_accumulation_steps: int, world_size: int
) -> Optional[str]:
    """Refusal of a mid-epoch training state saved with another global batch (``batch_size x
    gradient_accumulation_steps x world size``): its position in the epoch is a number of samples this run's steps
    cannot continue from (at an epoch end there is no position, and any batch resumes)."""
    if state.get("dataloader") is None:
        return None
    saved, current = state.get("global_batch"), batch_size * gradient_accumulation_steps * world_size
    if saved is None or saved == current:
        return None
    settings = state.get("settings") if isinstance(state.get("settings"), Mapping) else {}
    old_split = (
        f" (batch_size={settings['batch_size']} x gradient_accumulation_steps={settings['gradient_accumulation_steps']} "
        f"x {state.get('world_size', 1)} process(es))"
        if "batch_size" in settings and "gradient_accumulation_steps" in settings else ""
    )
    return (
        f"the training state {str(path)!r} was saved mid-epoch by a run on {state.get('world_size', 1)} process(es) "
        f"with a global batch of {saved} samples{old_split}; this run has {world_size} with {current} "
        f"(batch_size={batch_size} x gradient_accumulation_steps={gradient_accumulation_steps} x world size): its "
        f"position in the epoch cannot be carried over. Resume with a global batch of {saved} samples, or from an "
        "epoch-end training state"
    )


def lr_schedule_change(
    state: Mapping[str, Any],
    *,
    schedule_steps: int,
    steps_per_epoch: int,
    ended_lr: float,
    resumed_lr: float,
    output_dir: Path,
) -> Optional[str]:
    """A warning when a resumed run's learning-rate schedule spans another number of steps than the checkpoint's
    (``epochs`` raised to extend a finished run, or changed mid-run): the lr jumps to the new schedule's value.

    The recipe cannot keep the old schedule: torchtune's schedulers span ``num_training_steps``, which the recipe
    sets to ``epochs x steps per epoch`` (and past its end a cosine would rise again). States written before the
    schedule's length was recorded count ``total_epochs x steps_per_epoch``.
    """
    saved = state.get("lr_schedule_steps")
    if saved is None and isinstance(state.get("total_epochs"), int):
        saved = state["total_epochs"] * steps_per_epoch
    if saved is None or saved == schedule_steps:
        return None
    step, epochs_run = state.get("global_step"), int(state.get("epochs_run", 0))
    alternative = (
        "; to go on at a learning rate you choose instead, start a new run from the last export "
        f"(checkpointer.checkpoint_dir={Path(output_dir) / f'epoch_{epochs_run - 1}'}) with its own optimizer.lr and "
        "lr_scheduler"
        if epochs_run > 0 else ""
    )
    return (
        f"the learning-rate schedule changes on resume: the checkpoint was trained with a schedule of {saved} steps, "
        f"this run's spans {schedule_steps} (epochs x steps per epoch), so the lr jumps from {ended_lr:.6g} (where the "
        f"run stood after step {step}) to {resumed_lr:.6g} and follows the new schedule from there. The recipe cannot "
        f"keep the old schedule (it always spans epochs x steps per epoch){alternative}"
    )


# Settings recorded in a training state and compared on resume.
RESUME_SETTINGS = ("optimizer", "batch_size", "gradient_accumulation_steps", "kd_loss", "loss_scaling", "teacher_cache")


def resume_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``cfg`` a resume compares with the checkpoint's (plain containers)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), (DictConfig, ListConfig)) else cfg.get(key)
        for key in RESUME_SETTINGS
    }


def check_resumed_settings(
    cfg: Mapping[str, Any], state: Mapping[str, Any], layer_pairs: list, output_dir: Path
) -> list[str]:
    """Refuse a changed layer mapping; return a warning for every other setting that differs from the checkpoint's.

    Raises:
        ConfigError: ``layer_mapping`` resolves to other pairs than the checkpoint's (its projections and optimiser
            state belong to those).
    """
    from torchtune_kd.core.preflight import ConfigError

    saved_pairs = state.get("layer_pairs")
    pairs = [list(p) for p in layer_pairs]
    if saved_pairs is not None and [list(p) for p in saved_pairs] != pairs:
        raise ConfigError(
            [
                f"layer_mapping resolves to {pairs} but the checkpoint in {str(output_dir)!r} was trained with "
                f"{saved_pairs}: its projections and optimiser state belong to those pairs. Resume with the "
                "checkpoint's layer_mapping, or start a new run (new output_dir)."
            ]
        )
    saved, current = state.get("settings") or {}, resume_settings(cfg)
    uses = {
        "optimizer": "the checkpoint's optimiser state is restored, including its learning rate, betas and weight "
        "decay (PyTorch restores param-group settings); start a new run to change them",
    }
    warnings = []
    for key in RESUME_SETTINGS:
        if key in saved:
            message = describe_change(key, saved[key], current[key], used=uses.get(key, "the config's value is used from here on"))
            if message:
                warnings.append(message)
    return warnings
