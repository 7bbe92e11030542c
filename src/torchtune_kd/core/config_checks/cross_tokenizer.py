"""``cross_tokenizer``: distillation from a teacher with another tokenizer (``core.cross_tokenizer``).

The section switches it on; ``teacher_tokenizer`` names the teacher's tokenizer. What it supports and refuses, each
refusal naming the key and the fix (before any weight loads):

- IR (``layer_mapping``): refused: hidden states are compared position by position, and the two tokenizations have
  different positions (aligned boundaries are too sparse and uneven to carry a per-layer loss honestly);
- ``teacher_cache``: refused: a cache stores the teacher's rows at the student's positions of one tokenizer;
- ``on_policy`` generation and packed datasets: refused (generated and packed sequences are not re-tokenised);
- ``fused_output``: the unfused pass (``auto`` chooses it; ``true`` is refused by ``config_checks.execution``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from torchtune_kd.core.config_checks.common import Findings, show, unknown_key_problems
from torchtune_kd.core.data import packed_sections

# ULD off by default: on the SmolLM2 grid (README) it added nothing measurable to the exact part (Δ bits/byte
# +0.004 ± 0.005) and alone it trained worse than CE-only; it stays available for pairs that share few tokens.
DEFAULTS = {"exact_weight": 1.0, "uld_weight": 0.0, "uld_top_k": 64}


@dataclass(frozen=True)
class CrossTokenizerSettings:
    """The section's values (see ``core.cross_tokenizer_loss.CrossTokenizerKD``)."""

    exact_weight: float = DEFAULTS["exact_weight"]
    uld_weight: float = DEFAULTS["uld_weight"]
    uld_top_k: int = DEFAULTS["uld_top_k"]


def settings(cfg: DictConfig) -> Optional[CrossTokenizerSettings]:
    """The settings, ``None`` when the section is absent (call after :func:`check_section` passed)."""
    section = cfg.get("cross_tokenizer", None)
    if section is None:
        return None
    return CrossTokenizerSettings(**{key: section.get(key, default) for key, default in DEFAULTS.items()})


def _number_problem(key: str, value: Any, integer: bool) -> Optional[str]:
    bad_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if integer and (bad_type or value < 1):
        return f"cross_tokenizer.{key}={show(value)} must be an integer >= 1"
    if not integer and (bad_type or value < 0):
        return f"cross_tokenizer.{key}={show(value)} must be a number >= 0"
    return None


def check_section(cfg: DictConfig) -> Findings:
    """The section's keys and values, and what it cannot be combined with."""
    found = Findings()
    section = cfg.get("cross_tokenizer", None)
    if section is None:
        return found
    if not isinstance(section, DictConfig):
        found.problems.append(
            f"cross_tokenizer={show(section)} must be a mapping, e.g. cross_tokenizer: {{exact_weight: 1.0, "
            "uld_weight: 0.0, uld_top_k: 64}} (an empty mapping takes the defaults)"
        )
        return found
    found.problems.extend(unknown_key_problems(section, "cross_tokenizer", DEFAULTS))
    values = {key: section.get(key, default) for key, default in DEFAULTS.items()}
    for key, value in values.items():
        problem = _number_problem(key, value, integer=key == "uld_top_k")
        if problem:
            found.problems.append(problem)
    if found.ok and values["exact_weight"] == 0 and values["uld_weight"] == 0:
        found.problems.append("cross_tokenizer.exact_weight and cross_tokenizer.uld_weight are both 0: give one a "
                              "weight > 0, or distil without KD (kd weight 0) and no cross_tokenizer")
    what = "cross_tokenizer (a teacher with another tokenizer)"
    if not isinstance(cfg.get("teacher_tokenizer", None), DictConfig):
        found.problems.append(
            f"{what} needs teacher_tokenizer: the teacher's own tokenizer section (a _component_ and its files)"
        )
    if cfg.get("layer_mapping", None) is not None:
        found.problems.append(
            f"layer_mapping={show(cfg.layer_mapping)} with {what}: the IR loss compares hidden states position by "
            "position, and the two tokenizations have different positions, so IR across tokenizers is not "
            "supported. Set layer_mapping=null loss_scaling.manual_scales.ir=0"
        )
    if cfg.get("teacher_cache", None) is not None:
        found.problems.append(
            f"teacher_cache with {what}: a cache holds the teacher's rows at the positions of one tokenizer; a "
            "foreign-tokenizer teacher is run live. Remove teacher_cache (teacher_cache=null)"
        )
    on_policy = cfg.get("on_policy", None)
    if isinstance(on_policy, DictConfig) and (on_policy.get("fraction", 0) or on_policy.get("teacher_generated", False)):
        found.problems.append(
            f"on_policy with {what}: generated sequences are not re-tokenised for the teacher. Turn generation off "
            "(on_policy=null)"
        )
    for where in packed_sections(cfg.get("dataset", None)):
        found.problems.append(
            f"{where}.packed=True with {what}: a pack is re-tokenised as one text, across its samples' boundaries. "
            f"Set {where}.packed=False"
        )
    return found
