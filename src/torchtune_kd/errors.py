"""The errors a user can act on, in one place: every module raises these, every entry point catches them.

Each message names what is wrong (the key, option, file or folder), the value found and the fix. Entry points print
the message and exit with status 1 instead of a traceback. This module imports nothing of the project, so any module
may import it without creating an import cycle.
"""

from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """Every problem found in a config (its keys, files, data, output folder or resume), one per line."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the config:\n  - " + "\n  - ".join(self.problems))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written safely; the message names the file and the fix."""


class CacheError(ValueError):
    """A teacher cache that cannot be used or written; the message names the key, the value and the fix."""


class TrainingDivergedError(RuntimeError):
    """A loss component or the gradient norm became NaN/inf; no weights of that step were applied or saved."""


class OutputFolderError(ValueError):
    """A folder cannot be written without risking a user's files; the message names the folder and the fix."""


class OutputFileError(ValueError):
    """An output file cannot be written without replacing a file; the message names the option, the path and the fix."""


# What a recipe or script turns into "error: <message>" and exit status 1.
USER_ERRORS = (ConfigError, CheckpointError, CacheError, TrainingDivergedError, OutputFolderError, OutputFileError)
