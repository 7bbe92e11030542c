"""``output_dir`` and ``resume_from_checkpoint``: the run can write its folder under the output-folder rule, and a
resume does not change what its training state cannot follow. Nothing is created or loaded into code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from torchtune_kd.core import checkpointing, loss_weighting, training_state
from torchtune_kd.core.config_checks.common import Findings


@dataclass
class OutputFindings(Findings):
    """The problems of ``output_dir``; ``folder_ok`` is False when the folder itself cannot take this run (then
    nothing in it is worth reading for a resume)."""

    folder_ok: bool = True


def check_output_dir(cfg: DictConfig) -> OutputFindings:
    """The run can create ``output_dir`` (or write in it), tested on its nearest existing folder: nothing is created;
    and the folder follows the output-folder rule (``checkpointing.check_output_dir``): no other run's outputs, no
    file of the user's where the run writes, no input where the run writes."""
    found = OutputFindings()
    value = cfg.get("output_dir", None)
    if value is None:
        return found  # reported as a missing required key
    target = Path(str(value)).expanduser().absolute()
    probe = target
    # os.path.exists is False (not an exception) for paths we may not even look into.
    while not os.path.exists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        found.problems.append(
            f"output_dir={str(value)!r} cannot be created: {str(probe)!r} is a file, not a folder: point output_dir at "
            "a folder you can write to"
        )
        found.folder_ok = False
        return found
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == target else f": its nearest existing folder {str(probe)!r} does not allow this user to create files"
        found.problems.append(
            f"output_dir={str(value)!r} is not writable{where}: point output_dir elsewhere or fix the folder's "
            "permissions"
        )
        found.folder_ok = False
        return found
    epochs = cfg.get("epochs")
    rule = dict(
        epochs=epochs if isinstance(epochs, int) and epochs > 0 else 1,
        resume=cfg.get("resume_from_checkpoint", False) is True,
        overwrite=cfg.get("overwrite_output_dir", False) is True,
        side=checkpointing.side_dirs(cfg),
    )
    # The shared output-folder rule (new, empty or the recipes' own folder; a user's entry where the run writes is
    # refused), an earlier run there, or an input where this run writes (kept out with overwrite too).
    found.problems.extend(checkpointing.check_output_dir(target, inputs=checkpointing.config_input_paths(cfg), **rule))
    # The same rule without the inputs says whether the folder itself is refused (an input inside it is not).
    found.folder_ok = not checkpointing.check_output_dir(target, inputs={}, **rule)
    return found


def check_resume(
    cfg: DictConfig, weighting: Optional[loss_weighting.LossWeighting], world_size: int
) -> Findings:
    """What a resume cannot change, read from the newest training state's recorded settings (memory-mapped, never
    unpickled into code) before any weights load: the loss-scaling method, and the global batch of a mid-epoch
    state. A state of another format is refused here by name; one that cannot be read this way is left to the
    recipe, which names the file and the fix.

    Args:
        cfg (DictConfig): the config (its ``output_dir`` passed :func:`check_output_dir`).
        weighting (Optional[LossWeighting]): the loss weighting, ``None`` when ``loss_scaling`` is invalid.
        world_size (int): the number of data-parallel ranks.
    """
    found = Findings()
    if cfg.get("resume_from_checkpoint", False) is not True or cfg.get("output_dir", None) is None:
        return found
    peeked = checkpointing.peek_training_state(Path(str(cfg.output_dir)).expanduser())
    if peeked is None:
        return found
    state, path = peeked
    batch, accumulation = cfg.get("batch_size"), cfg.get("gradient_accumulation_steps")
    valid_batch = isinstance(batch, int) and isinstance(accumulation, int) and batch > 0 and accumulation > 0
    found.problems.extend(training_state.resume_problems(
        state, path, scaling_method=weighting.method if weighting is not None else None,
        batch_size=batch if valid_batch else None, gradient_accumulation_steps=accumulation if valid_batch else None,
        world_size=world_size,
    ))
    return found
