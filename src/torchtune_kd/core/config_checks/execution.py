"""How the step runs: ``fused_output`` (the output layer, CE and KD in one chunked pass) and the FSDP keys of the
distributed recipe."""

from __future__ import annotations

import difflib
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig

import kd_losses
from torchtune_kd.core.config_checks.common import Findings, show

FUSED_OUTPUT_KEYS = frozenset({"enabled", "chunk_size"})
FSDP_KEYS = ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers")


def check_fused_output(cfg: DictConfig, kd_class: Any) -> Findings:
    """``fused_output: {enabled, chunk_size}``: what the fused output + loss pass supports.

    Args:
        cfg (DictConfig): the config.
        kd_class (Any): the imported ``kd_loss._component_``, ``None`` when it does not import (reported where
            ``kd_loss`` is checked).
    """
    found = Findings()
    problems = found.problems
    fused = cfg.get("fused_output", None)
    if fused is None:
        return found
    if not isinstance(fused, DictConfig):
        problems.append(f"fused_output={show(fused)} must be a mapping, e.g. fused_output: {{enabled: true, chunk_size: 1024}}")
        return found
    for key in fused.keys():
        if key not in FUSED_OUTPUT_KEYS:
            close = difflib.get_close_matches(str(key), sorted(FUSED_OUTPUT_KEYS), n=1)
            fix = f"did you mean 'fused_output.{close[0]}'?" if close else f"the keys are {sorted(FUSED_OUTPUT_KEYS)}"
            problems.append(f"unknown key 'fused_output.{key}': {fix}")
    enabled = fused.get("enabled", False)
    if not isinstance(enabled, bool):
        problems.append(f"fused_output.enabled={enabled!r} must be true or false")
        return found
    chunk = fused.get("chunk_size", 1024)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        problems.append(f"fused_output.chunk_size={chunk!r} must be an integer >= 1 (tokens per chunk, e.g. 1024)")
    if not enabled:
        return found
    model = cfg.get("model", None)
    if isinstance(model, DictConfig) and model.get("apply_lora_to_output", False) is True:
        problems.append(
            "fused_output.enabled=true computes the student's logits from model.output's weight, which LoRA on the "
            "output layer would change: set model.apply_lora_to_output=false or fused_output.enabled=false"
        )
    if kd_class is not None and not kd_losses.is_divergence(kd_class):
        problems.append(
            f"fused_output.enabled=true needs a kd_losses divergence (it uses their hand-derived gradients), but "
            f"kd_loss._component_={cfg.kd_loss._component_!r} is not one: use e.g. kd_losses.ForwardKLLoss, or "
            "fused_output.enabled=false"
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
