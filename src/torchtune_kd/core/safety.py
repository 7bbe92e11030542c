"""Stopping a run safely: on a non-finite step (divergence) and on SIGTERM/SIGINT (preemption, Ctrl-C).

- :class:`NonFiniteGuard` looks at a step's values *before* the optimiser applies the step: a NaN/inf loss
  component or gradient norm either skips the step (within a budget the user set, ``max_nonfinite_steps``) or stops
  the run with :class:`TrainingDivergedError`, naming the step, the component(s) and the last good checkpoint.
- :class:`StopSignals` turns SIGTERM/SIGINT into a flag the training loop reads after each optimiser step, so the
  step in progress finishes and a resumable checkpoint is written; a second Ctrl-C aborts at once. The recipe then
  exits with 128 + the signal; :func:`exit_note` is its last line, saying so (and, under torchrun, that the launcher
  turns it into exit status 1: a worker cannot change the launcher's status).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from types import FrameType
from typing import Any, Mapping, Optional, Sequence

from torchtune import utils

from torchtune_kd.errors import TrainingDivergedError  # noqa: F401  (raised here; re-exported for callers)

log = utils.get_logger("INFO")

# The components whose non-finite value means the step must not be applied.
CHECKED = ("loss", "ce", "kd", "ir", "grad_norm")
# Exit status after a signal-triggered checkpoint: the shell's convention (128 + signal number), so schedulers and
# scripts see that the run stopped early although nothing was lost.
SIGNAL_EXIT_BASE = 128


class NonFiniteGuard:
    """Decide, once per optimiser step, whether its update may be applied.

    Args:
        max_skips (int): how many non-finite steps may be skipped over the whole run (0: stop at the first).
        skipped (int): steps already skipped (restored on resume). Default 0.
    """

    def __init__(self, max_skips: int, skipped: int = 0) -> None:
        self.max_skips = max_skips
        self.skipped = skipped

    def check(self, values: Mapping[str, float], *, step: int, epoch: int, last_checkpoint: Optional[Path]) -> bool:
        """True if the step may be applied; False to skip it (with a warning).

        Args:
            values (Mapping[str, float]): the step's values (``loss``, ``ce``, ``kd``, ``ir``, ``grad_norm``, ...).
            step (int): the 1-based number of this optimiser step.
            epoch (int): the 0-based epoch.
            last_checkpoint (Optional[Path]): the newest training state written so far.

        Raises:
            TrainingDivergedError: a non-finite value beyond the skip budget.
        """
        bad = {k: values[k] for k in CHECKED if k in values and not math.isfinite(values[k])}
        if not bad:
            return True
        self.skipped += 1
        where = f"step {step} (epoch {epoch + 1})"
        found = ", ".join(f"{k}={v}" for k, v in bad.items())
        if self.skipped > self.max_skips:
            last = str(last_checkpoint) if last_checkpoint else "none (nothing was saved before this step)"
            raise TrainingDivergedError(
                f"training diverged at {where}: {found}. This step's update was not applied and nothing was saved. "
                f"Last good checkpoint: {last}. Lower the learning rate, set clip_grad_norm, or check the data; "
                f"max_nonfinite_steps=N skips up to N such steps (now {self.max_skips})."
            )
        log.warning(
            f"Skipping {where}: {found} (non-finite step {self.skipped} of max_nonfinite_steps={self.max_skips}); "
            "no update applied."
        )
        return False


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`received` instead of killing the process.

    The loop checks :attr:`received` after each optimiser step, checkpoints and stops. A second SIGINT raises
    ``KeyboardInterrupt`` (abort without saving). The previous handlers are restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            f"Received {signal.Signals(signum).name}: finishing the current optimiser step, then saving a resumable "
            "checkpoint (press Ctrl-C again to abort without saving)."
        )

    def __enter__(self) -> "StopSignals":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def report(self, step: int, checkpoint: Optional[Path], signum: Optional[int] = None, note: str = "") -> None:
        """Say where the resumable checkpoint is and how to resume (``signum``: the signal that stopped the run, by
        default the one this process received; under data parallelism another rank may have received it; ``note``:
        what the exit status will be, see :func:`exit_note`)."""
        log.warning(
            f"Stopped by {signal.Signals(signum or self.received).name} after step {step}: resumable checkpoint in {checkpoint}. "
            "Resume with the same command plus resume_from_checkpoint=True." + (f" {note}" if note else "")
        )


def exit_note(signum: int, *, launcher: bool = False) -> str:
    """The line that says which exit status follows a signal stop.

    Args:
        signum (int): the signal that stopped the run.
        launcher (bool): the process is a worker of torchrun (``tune run --nproc_per_node``), which turns any
            non-zero worker status into its own exit status 1; that cannot be changed from a worker, so the line
            says it, for a user reading a "failed" job's log.
    """
    name, status = signal.Signals(signum).name, SIGNAL_EXIT_BASE + signum
    if not launcher:
        return f"Exiting with status {status} (128 + {name})."
    return (
        f"Each rank exits with status {status} (128 + {name}); torchrun reports that as a failed job (exit status 1 "
        f"and a ChildFailedError summary listing exitcode {status} per rank, or a SignalException traceback when "
        "torchrun itself received the signal), but this checkpoint is complete."
    )
