"""The training states of an output folder: ``training_state/step_S/recipe_state.pt``, one per saved optimiser step.

A state's file is written atomically, so a ``step_*`` folder holding it is complete; the newest ``keep_last_n`` are
kept. What a state holds, and how it is checked: :mod:`torchtune_kd.core.training_state`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

from torchtune_kd.core import training_state
from torchtune_kd.core.checkpointing.atomic import atomic_torch_save
from torchtune_kd.errors import ConfigError

TRAINING_STATE_DIR = "training_state"
STATE_FILE = "recipe_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    """The newest complete training state's file (``None`` when there is none)."""
    states = list_training_states(output_dir)
    return states[-1][1] if states else None


def save_training_state(
    state: training_state.StateLike, output_dir: Path, step: int, keep_last_n: int
) -> Path:
    """Write the state of optimiser step ``step`` atomically, then drop all but the newest ``keep_last_n`` states.

    The new state is complete before any older one is removed, so a crash at any point leaves a resumable folder.

    Args:
        state (StateLike): a :class:`~torchtune_kd.core.training_state.TrainingState`, or a mapping of its fields.
        output_dir (Path): the run's folder.
        step (int): the optimiser step the state follows.
        keep_last_n (int): how many states to keep (the newest).
    """
    path = state_dir(output_dir, step) / STATE_FILE
    atomic_torch_save(training_state.stored_form(state), path)
    prune_training_states(output_dir, keep_last_n)
    return path


def prune_training_states(output_dir: Path, keep_last_n: int) -> list[Path]:
    """Remove the oldest complete training states beyond ``keep_last_n``."""
    states = list_training_states(output_dir)
    removed = []
    for _, path in states[: max(len(states) - keep_last_n, 0)]:
        shutil.rmtree(path.parent)
        removed.append(path.parent)
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


def load_latest_training_state(output_dir: Path) -> tuple[training_state.TrainingState, Path]:
    """The newest complete training state of ``output_dir`` and its file, loaded without unpickling code.

    Raises:
        ConfigError: there is no training state to resume.
        CheckpointError: the state cannot be loaded safely, has another format or misses a field.
    """
    path = latest_training_state(output_dir)
    if path is None:
        raise ConfigError(
            [
                f"resume_from_checkpoint=True but {str(Path(output_dir) / TRAINING_STATE_DIR)!r} holds no training "
                "state: run without resuming first, or point output_dir at the run to resume"
            ]
        )
    return training_state.read(path), path


def peek_training_state(output_dir: Path) -> Optional[tuple[dict[str, Any], Path]]:
    """The newest training state of ``output_dir`` and its file, read cheaply for the pre-flight (memory-mapped,
    never unpickling code, not validated: see :func:`training_state.peek`). ``None`` when there is none or it cannot
    be read this way (the recipe then loads it and reports why)."""
    path = latest_training_state(output_dir)
    if path is None:
        return None
    stored = training_state.peek(path)
    return None if stored is None else (stored, path)
