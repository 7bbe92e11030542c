"""What every section's validator shares: its result type and how config values are read and shown in messages."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass
class Findings:
    """What one validator found: problems (each naming the key, the value and the fix) and notices (not errors).

    Attributes:
        problems (list[str]): what must change before the run can start.
        notices (list[str]): what the user should know although nothing is wrong.
    """

    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found (notices do not count)."""
        return not self.problems

    def add(self, other: "F") -> "F":
        """Append ``other``'s problems and notices to this one's; return ``other``, whose ``ok`` and learned values
        (``layer_pairs``, ``weighting``, ...) the caller reads next."""
        self.problems.extend(other.problems)
        self.notices.extend(other.notices)
        return other


F = TypeVar("F", bound=Findings)


def component(section: Any) -> Optional[str]:
    """A section's ``_component_`` (``None`` when it is not a mapping or has none)."""
    return section.get("_component_") if isinstance(section, DictConfig) else None


def show(value: Any) -> str:
    """``repr`` of a config value, with OmegaConf containers shown as plain lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def short(err: BaseException, limit: int = 200) -> str:
    """A library error on one short line: some (tiktoken's) quote a whole binary file back."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def as_number(value: Any, *, strings: bool = True) -> Optional[float]:
    """``value`` as a finite float, or ``None``. Booleans are not numbers here (YAML's ``yes`` would pass)."""
    if isinstance(value, bool) or (isinstance(value, str) and not strings):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def int_problem(cfg: DictConfig, key: str, *, minimum: int, optional: bool = False) -> Optional[str]:
    """Why ``cfg[key]`` is not an integer >= ``minimum`` (``optional``: null is allowed), or ``None``."""
    value = cfg.get(key, None)
    if value is None:
        if not optional and key in cfg:
            return f"{key}=None must be an integer >= {minimum}"
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"{key}={value!r} must be an integer >= {minimum}"
    return None


def unknown_key_problems(section: DictConfig, name: str, known: Any) -> list[str]:
    """One problem per key of ``section`` (the config's ``name`` section) not in ``known``, with a did-you-mean."""
    problems = []
    for key in section.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            fix = f"did you mean '{name}.{close[0]}'?" if close else f"the keys are {sorted(known)}"
            problems.append(f"unknown key '{name}.{key}': {fix}")
    return problems
