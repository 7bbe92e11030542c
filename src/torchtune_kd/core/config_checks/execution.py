"""How the step runs: ``fused_output`` (the output layer, CE and KD in one chunked pass) and the FSDP keys of the
distributed recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig

import kd_losses
from torchtune_kd.core.config_checks.common import Findings, show, unknown_key_problems

FUSED_OUTPUT_KEYS = frozenset({"enabled", "chunk_size"})
FSDP_KEYS = ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers")
AUTO = "auto"


@dataclass
class OutputPathFindings(Findings):
    """What :func:`check_fused_output` found and decided.

    Attributes:
        fused (bool): the run takes the fused output pass.
        chunk_size (Optional[int]): tokens per chunk of the fused pass; ``None``: derived from each micro-batch's
            shapes (``fused_output.auto_chunk_size``).
        auto (bool): the path was chosen by ``enabled: auto`` (so a student whose output layer turns out not to be a
            plain linear at set-up falls back to the unfused pass instead of failing).
        reason (str): why this path, for the start-up line.
    """

    fused: bool = False
    chunk_size: Optional[int] = None
    auto: bool = True
    reason: str = ""


def _unfused_reasons(cfg: DictConfig, kd_class: Any) -> list[str]:
    """What in the config the fused pass cannot do (each a reason naming the key), empty when it can run."""
    reasons = []
    model = cfg.get("model", None)
    if isinstance(model, DictConfig) and model.get("apply_lora_to_output", False) is True:
        reasons.append(
            "model.apply_lora_to_output=true: the fused pass computes the student's logits from model.output's "
            "weight, which LoRA on the output layer would change"
        )
    if cfg.get("cross_tokenizer", None) is not None:
        reasons.append(
            "cross_tokenizer is set: the teacher's rows are gathered at aligned positions of another vocabulary, "
            "which the fused pass's shared output product cannot do"
        )
    if kd_class is not None and not kd_losses.is_divergence(kd_class):
        reasons.append(
            f"kd_loss._component_={cfg.kd_loss._component_!r} is not a kd_losses divergence (the fused pass uses "
            "their hand-derived gradients)"
        )
    return reasons


def check_fused_output(cfg: DictConfig, kd_class: Any) -> OutputPathFindings:
    """``fused_output: {enabled, chunk_size}``: which output pass the run takes, and why.

    ``enabled`` is ``auto`` (the default, also when the section is absent), ``true`` or ``false``. ``auto`` takes
    the fused pass (the output layer, CE and KD in one chunked pass: ``core.fused_output``) wherever it supports
    the setting: a ``kd_losses`` divergence and a student output layer without LoRA; otherwise the unfused pass,
    saying why. ``true`` where the fused pass cannot run is a problem naming the key. ``chunk_size`` is ``auto``
    (the default: derived from the shapes) or a positive token count.

    Args:
        cfg (DictConfig): the config.
        kd_class (Any): the imported ``kd_loss._component_``, ``None`` when it does not import (reported where
            ``kd_loss`` is checked).
    """
    found = OutputPathFindings()
    problems = found.problems
    fused = cfg.get("fused_output", None)
    if fused is None:
        fused = DictConfig({})
    if not isinstance(fused, DictConfig):
        problems.append(f"fused_output={show(fused)} must be a mapping, e.g. fused_output: {{enabled: auto, chunk_size: auto}}")
        return found
    problems.extend(unknown_key_problems(fused, "fused_output", FUSED_OUTPUT_KEYS))
    enabled = fused.get("enabled", AUTO)
    if not (isinstance(enabled, bool) or enabled == AUTO):
        problems.append(f"fused_output.enabled={enabled!r} must be auto, true or false")
        return found
    chunk = fused.get("chunk_size", AUTO)
    if chunk != AUTO and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        problems.append(
            f"fused_output.chunk_size={chunk!r} must be auto (derived from the vocabulary, hidden size and tokens of "
            "each step) or an integer >= 1 (tokens per chunk)"
        )
    found.chunk_size = None if chunk == AUTO or not isinstance(chunk, int) else chunk
    reasons = _unfused_reasons(cfg, kd_class)
    found.auto = enabled == AUTO
    if enabled is False:
        found.reason = "fused_output.enabled=false"
    elif enabled is True and reasons:
        problems.extend(f"fused_output.enabled=true, but {reason}: fix that, or set fused_output.enabled=false (or auto)"
                        for reason in reasons)
    elif reasons:
        found.reason = f"fused_output.enabled=auto, and {'; '.join(reasons)}"
    else:
        found.fused = True
        found.reason = (f"fused_output.enabled={'auto' if found.auto else 'true'}: a kd_losses divergence and a plain "
                        "student output layer")
    size = "auto (about vocab / hidden chunks per step)" if found.chunk_size is None else f"{found.chunk_size} tokens"
    found.notices.append(
        f"Output pass: {'fused' if found.fused else 'unfused'} ({found.reason})"
        + (f"; chunk size {size}." if found.fused else ".")
    )
    return found


def check_fsdp(cfg: DictConfig, world_size: Optional[int]) -> Findings:
    """The FSDP keys have the types the distributed recipe reads (``world_size``: its number of ranks); for the
    single-device recipe (``world_size=None``) setting them is a notice that they are ignored."""
    found = Findings()
    present = [key for key in FSDP_KEYS if cfg.get(key, None) is not None]
    if world_size is None:
        if present:
            found.notices.append(
                f"{', '.join(present)} only apply to recipes/knowledge_distillation_distributed.py; the single-device "
                "recipe ignores them"
            )
        return found
    for key in ("fsdp_cpu_offload", "fsdp_reshard_after_forward"):
        value = cfg.get(key, None)
        if value is not None and not isinstance(value, bool):
            found.problems.append(f"{key}={value!r} must be true or false")
    layers = cfg.get("custom_sharded_layers", None)
    if layers is not None and (
        not isinstance(layers, (list, ListConfig)) or not all(isinstance(name, str) and name for name in layers)
    ):
        found.problems.append(
            f"custom_sharded_layers={show(layers)} must be a list of module names, e.g. [tok_embeddings, output]"
        )
    return found
