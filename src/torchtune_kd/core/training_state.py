"""The training state: everything a resume needs, in the one format written, read and checked here.

A distillation recipe saves a state after optimiser step S (mid-epoch or at an epoch end) as
``training_state/step_S/recipe_state.pt`` (the folder and its files: :mod:`torchtune_kd.core.checkpointing`). The
state is a plain dict of tensors and containers (so it loads with ``torch.load(weights_only=True)``): the fields of
:class:`TrainingState` under their names, plus ``format`` = :data:`STATE_FORMAT`. The first five names are
torchtune's own (``training.SEED_KEY``, ``EPOCHS_KEY``, ``TOTAL_EPOCHS_KEY``, ``MAX_STEPS_KEY``, ``OPT_KEY``).

Reading refuses, naming the file, the value found and the fix: a file that cannot be loaded without unpickling code,
a state of another format (newer, unknown or none recorded) and a state missing a field. The resume checks compare
a state with the resumed run's config: what a resume cannot change is refused (:func:`resume_problems`,
:func:`check_resumed_settings`), what it changes is warned about (:func:`check_resumed_settings`,
:func:`lr_schedule_change`). The pre-flight runs :func:`resume_problems` on a state it has only peeked at (not
validated), so those checks read a plain mapping and tolerate missing entries.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from torchtune_kd.errors import CheckpointError, ConfigError

# The layout this module writes and the only one it reads; bumped whenever a field changes meaning or is removed.
STATE_FORMAT = 2
FORMAT_KEY = "format"
# Settings recorded in a training state and compared on resume.
RESUME_SETTINGS = (
    "optimizer", "batch_size", "gradient_accumulation_steps", "kd_loss", "loss_scaling", "teacher_cache", "on_policy",
    "teacher_tokenizer", "cross_tokenizer",
)
# The dataloader position :func:`resume_position` gives when the world size or batch size changed: samples this rank's
# sampler has already yielded in the epoch (the recipe loads it into the sampler).
SAMPLER_POSITION = "sampler_yielded"


@dataclass
class TrainingState:
    """One training state, as the recipes save it after an optimiser step.

    Attributes:
        seed (int): the run's seed (the data order depends on it, so a resume uses it).
        epochs_run (int): epochs finished.
        total_epochs (int): the config's ``epochs`` when saved.
        max_steps_per_epoch (Optional[int]): the config's ``max_steps_per_epoch`` (``None``: whole epochs).
        global_step (int): optimiser steps taken.
        steps_in_epoch (int): optimiser steps taken in the current epoch (0 at an epoch end).
        dataloader (Optional[dict]): the dataloader's own state mid-epoch (``None`` at an epoch end: an epoch's
            order follows from the seed and the epoch).
        samples_in_epoch (int): samples consumed in the epoch over all ranks (the position a run with another world
            size resumes from).
        global_batch (int): samples per optimiser step over all ranks (``batch_size x gradient_accumulation_steps x
            world size``).
        world_size (int): processes of the run that saved.
        lr_schedule_steps (int): the length of the learning-rate schedule trained with.
        optimizer (dict): ``Optimizer.state_dict()`` with full tensors.
        trainable (dict[str, torch.Tensor]): the student's trainable weights (the adapters for LoRA).
        projections (Optional[dict[str, torch.Tensor]]): the learned student->teacher projections (``None`` without a
            layer mapping).
        layer_pairs (list[list[int]]): the resolved ``layer_mapping`` (student layer, teacher layer).
        settings (dict): the settings :func:`resume_settings` records.
        loss_scaling (dict): :meth:`LossWeighting.state_dict` (method, scales, running magnitudes).
        nonfinite_steps (int): steps skipped for a non-finite loss or gradient so far.
        rng (dict): the RNG states (``cpu``, ``cuda``; ``per_rank`` under data parallelism).
    """

    seed: int
    epochs_run: int
    total_epochs: int
    max_steps_per_epoch: Optional[int]
    global_step: int
    steps_in_epoch: int
    dataloader: Optional[dict[str, Any]]
    samples_in_epoch: int
    global_batch: int
    world_size: int
    lr_schedule_steps: int
    optimizer: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    projections: Optional[dict[str, torch.Tensor]]
    layer_pairs: list[list[int]]
    settings: dict[str, Any]
    loss_scaling: dict[str, Any]
    nonfinite_steps: int
    rng: dict[str, Any]

    def __post_init__(self) -> None:
        # Pairs arrive as tuples from the alignment; stored and compared as lists.
        self.layer_pairs = [list(pair) for pair in self.layer_pairs]

    def as_dict(self) -> dict[str, Any]:
        """What is saved: every field under its name (shallow: tensors are not copied) and the format."""
        return {**{field.name: getattr(self, field.name) for field in fields(self)}, FORMAT_KEY: STATE_FORMAT}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], path: Path) -> "TrainingState":
        """The state a loaded file holds.

        Raises:
            CheckpointError: the file holds no state of :data:`STATE_FORMAT`, or misses a field; the message names
                ``path`` and the fix.
        """
        if not isinstance(stored, Mapping):
            raise CheckpointError(
                f"{str(path)!r} is not a training state written by this recipe (a {type(stored).__name__})"
            )
        problem = format_problem(stored, path)
        if problem:
            raise CheckpointError(problem)
        missing = [key for key in KEYS if key not in stored]
        if missing:
            raise CheckpointError(
                f"{str(path)!r} is not a training state written by this recipe: missing {missing}. Start a new run or "
                "point output_dir at the run to resume."
            )
        return cls(**{key: stored[key] for key in KEYS})


# Every field a saved state must hold, in the order they are saved.
KEYS = tuple(field.name for field in fields(TrainingState))
# A state as the recipe holds it, or a stored mapping (what the pre-flight peeked, not validated).
StateLike = Union[TrainingState, Mapping[str, Any]]


def stored_form(state: StateLike) -> dict[str, Any]:
    """The dict a state is saved as: a :class:`TrainingState`'s fields, or a mapping of them, with the format."""
    if isinstance(state, TrainingState):
        return state.as_dict()
    return {**state, FORMAT_KEY: STATE_FORMAT}


def _mapping(state: StateLike) -> Mapping[str, Any]:
    return state.as_dict() if isinstance(state, TrainingState) else state


def format_problem(state: StateLike, path: Path) -> Optional[str]:
    """Refusal of a state whose format is not :data:`STATE_FORMAT` (newer, unknown, or none recorded), naming the file,
    the format found and the fix (``None``: the format is the one this version reads)."""
    found = _mapping(state).get(FORMAT_KEY)
    if found == STATE_FORMAT and type(found) is int:
        return None
    shown = str(path)
    if found is None:
        return (
            f"the training state {shown!r} records no format (torchtune-kd's recipes write format {STATE_FORMAT} under "
            f"{FORMAT_KEY!r}): it was not written by them. Point output_dir at the run to resume, or start a new run "
            "(a new output_dir)"
        )
    if type(found) is int and found > STATE_FORMAT:
        return (
            f"the training state {shown!r} has format {found}, newer than format {STATE_FORMAT}, the only one this "
            "version of torchtune-kd reads: resume with the torchtune-kd version that wrote it, or start a new run "
            "(a new output_dir)"
        )
    return (
        f"the training state {shown!r} has format {found!r}, unknown to this version of torchtune-kd (it reads format "
        f"{STATE_FORMAT} only): resume with the torchtune-kd version that wrote it, or start a new run (a new "
        "output_dir)"
    )


# ------------------------------------------------------------------------------------------------ loading


def load(path: Path) -> dict[str, Any]:
    """The stored dict of the training state in ``path``, loaded without unpickling code (``weights_only=True``) and
    checked: of :data:`STATE_FORMAT`, with every field of :class:`TrainingState`.

    Raises:
        CheckpointError: the file is corrupt, holds objects other than tensors and plain containers (possibly
            crafted), has another format or misses a field; the message names the file and the fix.
    """
    path = Path(path)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals, truncation and zip errors all land here, and all are refused
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot load the training state {str(path)!r} safely ({type(err).__name__}: {reason}). It is corrupt, "
            "not written by this recipe, or holds objects other than tensors and plain containers (never loaded, "
            "as they could run code). Delete this step_* folder to resume from an older one, or start a new run."
        ) from None
    TrainingState.from_dict(stored, path)
    return stored


def read(path: Path) -> TrainingState:
    """The training state in ``path`` (see :func:`load`)."""
    return TrainingState.from_dict(load(path), Path(path))


# Errors a memory-mapped ``torch.load(weights_only=True)`` raises for a file it will not read: refused pickles,
# truncated or foreign zip archives, files not written by ``torch.save``, unreadable files.
_PEEK_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


def peek(path: Path) -> Optional[dict[str, Any]]:
    """The stored dict in ``path`` read cheaply for the pre-flight: memory-mapped (no tensor data is read) and
    without unpickling code (``weights_only=True``), not validated. ``None`` when it cannot be read this way: the
    recipe's :func:`load` then refuses it, naming the reason and the fix."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _PEEK_ERRORS:
        return None
    return stored if isinstance(stored, dict) else None


# ------------------------------------------------------------------------------------------------ resume checks


def _scaling_setting(method: str) -> str:
    """How a weighting method is set in the config (``blend`` is ``loss_scaling.enabled=false``)."""
    if method == "blend":
        return "loss_scaling.enabled=false (the kd_ratio blend)"
    return f"loss_scaling.method={method}"


def loss_scaling_problem(state: StateLike, path: Path, method: str) -> Optional[str]:
    """Refusal of a resume whose loss-scaling method (``blend``, ``manual`` or ``dynamic``) differs from the one the
    training state was trained with: its statistics and the meaning of its loss belong to that method. A state of
    another format is refused by :func:`format_problem` instead."""
    state = _mapping(state)
    if format_problem(state, path):
        return None
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
    state: StateLike, path: Path, *, batch_size: int, gradient_accumulation_steps: int, world_size: int
) -> Optional[str]:
    """Refusal of a mid-epoch training state saved with another global batch (``batch_size x
    gradient_accumulation_steps x world size``): its position in the epoch is a number of samples this run's steps
    cannot continue from (at an epoch end there is no position, and any batch resumes). A state of another format is
    refused by :func:`format_problem` instead."""
    state = _mapping(state)
    if format_problem(state, path) or state.get("dataloader") is None:
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


def resume_problems(
    state: StateLike,
    path: Path,
    *,
    scaling_method: Optional[str],
    batch_size: Optional[int],
    gradient_accumulation_steps: Optional[int],
    world_size: int,
) -> list[str]:
    """What a resume from ``state`` cannot change, each naming the file and the fix: its format, then (for a state of
    this format) the loss-scaling method and, mid-epoch, the global batch. What is not known yet (``None``: a setting
    that is itself invalid) is not compared."""
    problem = format_problem(state, path)
    if problem:
        return [problem]
    problems = []
    if scaling_method is not None:
        problems.append(loss_scaling_problem(state, path, scaling_method))
    if batch_size is not None and gradient_accumulation_steps is not None:
        problems.append(global_batch_problem(
            state, path, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            world_size=world_size,
        ))
    return [problem for problem in problems if problem]


def resume_position(
    state: TrainingState, folder: Path, *, world_size: int, batch_size: int, gradient_accumulation_steps: int
) -> Optional[dict[str, Any]]:
    """Where in the epoch a resume continues: ``None`` at an epoch end; the dataloader's own state when the world
    size and batch size are the ones that wrote it (it counts batches); otherwise ``{SAMPLER_POSITION: n}``, the
    samples each rank's sampler already yielded (the sampler deals samples to ranks round-robin, so the first ``n``
    of every rank are the first ``n * world_size`` overall).

    Raises:
        ConfigError: a mid-epoch state from a run with another global batch (``folder`` names it).
    """
    if state.dataloader is None:
        return None
    if state.world_size == world_size and state.settings.get("batch_size", batch_size) == batch_size:
        return state.dataloader
    problem = global_batch_problem(
        state, folder, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        world_size=world_size,
    )
    if problem or state.samples_in_epoch % world_size:
        raise ConfigError([problem or (
            f"the training state {str(folder)!r} was saved mid-epoch by a run on {state.world_size} process(es) at "
            f"{state.samples_in_epoch} samples, which {world_size} processes cannot split evenly: resume with its "
            "world size and batch_size, or from an epoch-end training state"
        )])
    return {SAMPLER_POSITION: state.samples_in_epoch // world_size}


def lr_schedule_change(
    state: TrainingState,
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
    sets to ``epochs x steps per epoch`` (and past its end a cosine would rise again).

    Args:
        state (TrainingState): the resumed state.
        schedule_steps (int): this run's schedule length; steps_per_epoch: its optimiser steps per epoch.
        ended_lr (float): the learning rate where the state stood; resumed_lr: where the new schedule puts it.
        output_dir (Path): the run's folder (the last export in it is named as an alternative start).
    """
    saved = state.lr_schedule_steps
    if saved == schedule_steps:
        return None
    alternative = (
        "; to go on at a learning rate you choose instead, start a new run from the last export "
        f"(checkpointer.checkpoint_dir={Path(output_dir) / f'epoch_{state.epochs_run - 1}'}) with its own optimizer.lr "
        "and lr_scheduler"
        if state.epochs_run > 0 else ""
    )
    return (
        f"the learning-rate schedule changes on resume: the checkpoint was trained with a schedule of {saved} steps, "
        f"this run's spans {schedule_steps} (epochs x steps per epoch), so the lr jumps from {ended_lr:.6g} (where the "
        f"run stood after step {state.global_step}) to {resumed_lr:.6g} and follows the new schedule from there. The "
        f"recipe cannot keep the old schedule (it always spans epochs x steps per epoch){alternative}"
    )


def resume_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``cfg`` a training state records and a resume compares (plain containers)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), (DictConfig, ListConfig)) else cfg.get(key)
        for key in RESUME_SETTINGS
    }


def describe_change(name: str, saved: Any, current: Any, *, used: str) -> Optional[str]:
    """A warning line when a setting differs between the checkpoint and the config (``None`` when equal)."""
    if saved == current:
        return None
    return f"{name} changed since the checkpoint ({saved!r} -> {current!r}): {used}"


def check_resumed_settings(
    cfg: Mapping[str, Any], state: TrainingState, layer_pairs: list, output_dir: Path
) -> list[str]:
    """Refuse a changed layer mapping; return a warning for every other setting that differs from the checkpoint's.

    Raises:
        ConfigError: ``layer_mapping`` resolves to other pairs than the checkpoint's (its projections and optimiser
            state belong to those).
    """
    pairs = [list(p) for p in layer_pairs]
    if state.layer_pairs != pairs:
        raise ConfigError(
            [
                f"layer_mapping resolves to {pairs} but the checkpoint in {str(output_dir)!r} was trained with "
                f"{state.layer_pairs}: its projections and optimiser state belong to those pairs. Resume with the "
                "checkpoint's layer_mapping, or start a new run (new output_dir)."
            ]
        )
    current = resume_settings(cfg)
    uses = {
        "optimizer": "the checkpoint's optimiser state is restored, including its learning rate, betas and weight "
        "decay (PyTorch restores param-group settings); start a new run to change them",
    }
    warnings = []
    for key in RESUME_SETTINGS:
        if key in state.settings:
            message = describe_change(
                key, state.settings[key], current[key], used=uses.get(key, "the config's value is used from here on")
            )
            if message:
                warnings.append(message)
    return warnings
