"""The config's top level: which keys exist and are required, and the plain settings (counts, flags, dtype, device).

Sections with settings of their own (losses, optimiser, checkpointers, data, ...) have their own validators; this
module checks the scalar keys beside them.
"""

from __future__ import annotations

import difflib
from typing import Optional

import torch
from omegaconf import DictConfig

from torchtune_kd.core.config_checks.common import Findings, int_problem

KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        # torchtune 0.6.1 knowledge_distillation_single_device keys
        "output_dir", "model", "teacher_model", "tokenizer", "checkpointer", "teacher_checkpointer",
        "resume_from_checkpoint", "save_adapter_weights_only", "dataset", "seed", "shuffle", "batch_size",
        "optimizer", "lr_scheduler", "loss", "kd_loss", "kd_ratio", "epochs", "max_steps_per_epoch",
        "gradient_accumulation_steps", "clip_grad_norm", "compile", "metric_logger", "log_every_n_steps",
        "log_peak_memory_stats", "device", "dtype", "enable_activation_checkpointing",
        "enable_activation_offloading", "profiler", "low_cpu_ram", "cudnn_deterministic_mode",
        # torchtune-kd additions
        "layer_mapping", "ir_loss", "loss_scaling", "projection_lr_multiplier", "save_projections",
        "save_every_n_steps", "keep_last_n", "overwrite_output_dir", "max_nonfinite_steps", "fused_output",
        "teacher_cache", "diagnostics_every_n_steps", "on_policy", "teacher_tokenizer", "cross_tokenizer",
        # the distributed recipe (torchtune's distributed recipes' names)
        *("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers"),
    }
)
REQUIRED_KEYS = (
    "output_dir", "model", "teacher_model", "tokenizer", "checkpointer", "teacher_checkpointer", "dataset",
    "optimizer", "loss", "kd_loss", "epochs", "batch_size", "device", "dtype", "metric_logger",
)
# Optional sections a null ``_component_`` switches off (see disable_null_components).
OPTIONAL_COMPONENTS = ("lr_scheduler", "ir_loss", "profiler")
# (key, minimum, optional) of the integer settings other than batch_size and epochs.
TRAINING_INTS = (
    ("gradient_accumulation_steps", 1, False),
    ("log_every_n_steps", 1, False),
    ("diagnostics_every_n_steps", 1, True),
    ("max_steps_per_epoch", 1, True),
    ("save_every_n_steps", 1, True),
    ("keep_last_n", 1, True),
    ("max_nonfinite_steps", 0, True),
)
FLAGS = ("resume_from_checkpoint", "overwrite_output_dir", "save_adapter_weights_only", "save_projections")


def disable_null_components(cfg: DictConfig) -> DictConfig:
    """Turn an optional section whose ``_component_`` is null into ``None`` (in place), meaning "not used".

    ``tune run ... lr_scheduler=None`` does not remove the section: torchtune's command line maps ``key=value``
    onto ``key._component_`` when the YAML section has one (and it refuses ``~key`` for components). So a null
    component is how a user switches off an optional part on the command line.
    """
    for key in OPTIONAL_COMPONENTS:
        section = cfg.get(key, None)
        if isinstance(section, DictConfig) and "_component_" in section and section.get("_component_") is None:
            cfg[key] = None
    return cfg


def check_keys(cfg: DictConfig) -> Findings:
    """Unknown top-level keys (with a did-you-mean) and missing required ones."""
    found = Findings()
    for key in cfg.keys():
        if key not in KNOWN_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), sorted(KNOWN_TOP_LEVEL_KEYS), n=1)
            fix = f"did you mean {close[0]!r}?" if close else "remove it (see the README's config reference)"
            found.problems.append(f"unknown key {key!r}: {fix}")
    for key in REQUIRED_KEYS:
        if cfg.get(key, None) is None:
            found.problems.append(f"missing required key {key!r}")
    return found


def missing(cfg: DictConfig, *keys: str) -> bool:
    """Whether any of the required ``keys`` is absent or null (reported by :func:`check_keys`)."""
    return any(cfg.get(key, None) is None for key in keys)


def check_run_size(cfg: DictConfig) -> Findings:
    """``batch_size`` and ``epochs`` are integers >= 1."""
    return Findings(problems=[p for key in ("batch_size", "epochs") if (p := int_problem(cfg, key, minimum=1))])


def check_training(cfg: DictConfig, *, check_device: bool) -> Findings:
    """The remaining counts, the true/false flags, ``dtype``, ``device`` (``check_device``: it exists),
    ``clip_grad_norm`` and ``projection_lr_multiplier``."""
    problems = [p for key, minimum, optional in TRAINING_INTS if (p := int_problem(cfg, key, minimum=minimum, optional=optional))]
    for flag in FLAGS:
        if not isinstance(cfg.get(flag, False), bool):
            problems.append(f"{flag}={cfg.get(flag)!r} must be true or false")

    dtype = cfg.get("dtype", None)
    if dtype is not None and dtype not in ("fp32", "bf16"):
        problems.append(f"dtype={dtype!r} is not supported: use 'bf16' (GPU) or 'fp32' (fp16 has no loss scaling here)")
    device = str(cfg.get("device", "cuda"))
    if check_device and device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={device!r} but no CUDA device is available: use device=cpu dtype=fp32 on CPU")
    if cfg.get("enable_activation_offloading", False) and not device.startswith("cuda"):
        problems.append("enable_activation_offloading=True needs a CUDA device: set it to False on CPU")

    clip = cfg.get("clip_grad_norm", None)
    if clip is not None and str(clip) != "inf":
        number = _float(clip)
        if number is None or number <= 0:
            problems.append(f"clip_grad_norm={clip!r} must be a positive number, 'inf' or null")
    multiplier = _float(cfg.get("projection_lr_multiplier", 1.0))
    if multiplier is None or not multiplier > 0:
        problems.append(f"projection_lr_multiplier={cfg.get('projection_lr_multiplier', 1.0)!r} must be a positive number")
    return Findings(problems=problems)


def _float(value: object) -> Optional[float]:
    """``float(value)`` as the recipe reads these settings (strings such as ``"1e-3"`` included), or ``None``."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
