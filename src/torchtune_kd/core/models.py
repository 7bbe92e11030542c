"""Building the student (LoRA or full fine-tune) and the frozen teacher from their configs and checkpoints.

torchtune 0.6.1's KD recipe only knows a LoRA student; here any student works: one whose model has LoRA adapters
trains only them (and its training state holds only them), any other trains every weight.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params, validate_missing_and_unexpected_for_lora

from torchtune_kd.core.checkpointing import LoraSpec
from torchtune_kd.core.preflight import model_config_without_flag

log = utils.get_logger("INFO")


def _instantiate(cfg_model: DictConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    cfg_plain, _ = model_config_without_flag(cfg_model)
    with training.set_default_dtype(dtype), device:
        return config.instantiate(cfg_plain)


def build_student(
    cfg_model: DictConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    base_state_dict: Mapping[str, Any],
    trainable_state_dict: Optional[Mapping[str, Any]] = None,
    compile_model: bool = False,
    activation_checkpointing: bool = False,
) -> tuple[nn.Module, Optional[LoraSpec]]:
    """Build the student, load its weights (and a resumed trainable state) and mark what trains.

    Args:
        cfg_model (DictConfig): the ``model`` section.
        device (torch.device): where to build it.
        dtype (torch.dtype): parameter dtype.
        base_state_dict (Mapping[str, Any]): the checkpoint's weights.
        trainable_state_dict (Optional[Mapping[str, Any]]): a training state's trainable weights (resume): the
            adapters of a LoRA student, all weights of a full one.
        compile_model (bool): compile each decoder layer (torchtune's ``compile_model``).
        activation_checkpointing (bool): wrap each decoder layer for activation checkpointing.

    Returns:
        tuple: the model and, for a LoRA student, its :class:`LoraSpec` (``None`` for a full fine-tune).
    """
    model = _instantiate(cfg_model, device, dtype)
    adapter_params = get_adapter_params(model)
    lora = None
    if adapter_params:
        lora = LoraSpec(
            rank=cfg_model.lora_rank,
            alpha=cfg_model.lora_alpha,
            attn_modules=list(cfg_model.lora_attn_modules),
            apply_to_mlp=cfg_model.get("apply_lora_to_mlp", False),
            apply_to_output=cfg_model.get("apply_lora_to_output", False),
        )
        set_trainable_params(model, adapter_params)
    if compile_model:
        training.compile_model(model)
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

    if lora is not None:
        base_missing, base_unexpected = model.load_state_dict(base_state_dict, strict=False)
        if any("magnitude" in name for name in adapter_params):  # DoRA
            for module in model.modules():
                if hasattr(module, "initialize_dora_magnitude"):
                    module.initialize_dora_magnitude()
        lora_missing, lora_unexpected = (None, None)
        if trainable_state_dict:
            lora_missing, lora_unexpected = model.load_state_dict(trainable_state_dict, strict=False)
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=lora.attn_modules,
            apply_lora_to_mlp=lora.apply_to_mlp,
            apply_lora_to_output=lora.apply_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
        training.validate_expected_param_dtype(adapter_params.items(), dtype=dtype)
    else:
        model.load_state_dict(trainable_state_dict or base_state_dict, strict=True)
        training.validate_expected_param_dtype(model.named_parameters(), dtype=dtype)

    kind = "LoRA" if lora is not None else "full fine-tune"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"Student ({kind}, {trainable:,} trainable parameters) is initialized with precision {dtype}.")
    return model, lora


def build_teacher(
    cfg_model: DictConfig, *, device: torch.device, dtype: torch.dtype, state_dict: Mapping[str, Any]
) -> nn.Module:
    """Build the frozen teacher: weights loaded strictly, eval mode, no gradients."""
    model = _instantiate(cfg_model, device, dtype)
    model.load_state_dict(state_dict)
    # eval() does not disable dropout inside SDPA (pytorch#124464); torchtune's models use none.
    model.eval().requires_grad_(False)
    training.validate_expected_param_dtype(model.named_parameters(), dtype=dtype)
    log.info(f"Teacher model is initialized with precision {dtype}.")
    return model
