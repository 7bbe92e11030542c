"""Building the student (LoRA or full fine-tune) and the frozen teacher from their configs and checkpoints.

torchtune 0.6.1's KD recipe only knows a LoRA student; here any student works: one whose model has LoRA adapters
trains only them (and its training state holds only them), any other trains every weight. Fresh adapters start from
``seeded_init`` (the seed and their names only), so a sharded student starts exactly where a single-device one does.

:func:`build_student` / :func:`build_teacher` build on one device; :func:`build_student_sharded` /
:func:`build_teacher_sharded` build on the meta device, shard with FSDP2 and load the same full checkpoints.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params, validate_missing_and_unexpected_for_lora

from torchtune_kd.core import distributed, seeded_init
from torchtune_kd.core.checkpointing import LoraSpec

log = utils.get_logger("INFO")


# Our per-model flag asking for the hidden states of every layer (alignment); torchtune's builders do not know it.
HIDDEN_STATES_FLAG = "output_hidden_states"


def model_config_without_flag(cfg_model: DictConfig) -> tuple[DictConfig, bool]:
    """Split our per-model ``output_hidden_states: true`` flag from the builder's kwargs.

    torchtune's builders do not know the flag (they would reject it), so the recipe consumes it here.
    """
    plain = OmegaConf.masked_copy(cfg_model, [k for k in cfg_model.keys() if k != HIDDEN_STATES_FLAG])
    flag = cfg_model.get(HIDDEN_STATES_FLAG, False)
    return plain, flag


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
    init_seed: int = 0,
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
        init_seed (int): the run's seed, for fresh LoRA adapters (``seeded_init``).

    Returns:
        tuple: the model and, for a LoRA student, its :class:`LoraSpec` (``None`` for a full fine-tune).
    """
    model = _instantiate(cfg_model, device, dtype)
    adapter_params = get_adapter_params(model)
    lora = _mark_trainable(model, cfg_model, adapter_params)
    _wrap(model, compile_model=compile_model, activation_checkpointing=activation_checkpointing)

    if lora is not None:
        base_missing, base_unexpected = model.load_state_dict(base_state_dict, strict=False)
        if not trainable_state_dict:
            model.load_state_dict(seeded_init.initial_adapter_state(adapter_params.items(), init_seed, dtype), strict=False)
        _init_dora_magnitudes(model, adapter_params, trainable_state_dict)
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

    _log_student(model, lora, dtype, "")
    return model, lora


def _mark_trainable(model: nn.Module, cfg_model: DictConfig, adapter_params: Mapping[str, Any]) -> Optional[LoraSpec]:
    """Only the adapters train in a LoRA student (returns its spec); every weight of any other student."""
    if not adapter_params:
        return None
    set_trainable_params(model, adapter_params)
    return LoraSpec(
        rank=cfg_model.lora_rank,
        alpha=cfg_model.lora_alpha,
        attn_modules=list(cfg_model.lora_attn_modules),
        apply_to_mlp=cfg_model.get("apply_lora_to_mlp", False),
        apply_to_output=cfg_model.get("apply_lora_to_output", False),
    )


def _wrap(model: nn.Module, *, compile_model: bool, activation_checkpointing: bool) -> None:
    if compile_model:
        training.compile_model(model)
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})


def _init_dora_magnitudes(
    model: nn.Module, adapter_params: Mapping[str, Any], trainable_state_dict: Optional[Mapping[str, Any]]
) -> None:
    """DoRA magnitudes start from the base weights (with LoRA B zero); a resumed state brings its own."""
    if any("magnitude" in name for name in adapter_params) and not trainable_state_dict:
        for module in model.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()


def _log_student(model: nn.Module, lora: Optional[LoraSpec], dtype: torch.dtype, where: str) -> None:
    kind = "LoRA" if lora is not None else "full fine-tune"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"Student ({kind}, {trainable:,} trainable parameters) is initialized with precision {dtype}{where}.")


def build_student_sharded(
    cfg_model: DictConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    base_state_dict: Mapping[str, Any],
    trainable_state_dict: Optional[Mapping[str, Any]] = None,
    compile_model: bool = False,
    activation_checkpointing: bool = False,
    init_seed: int = 0,
    custom_sharded_layers: Optional[Iterable[str]] = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> tuple[nn.Module, Optional[LoraSpec]]:
    """:func:`build_student` for data parallelism: built on the meta device, sharded with FSDP2, then loaded.

    Each rank ends up with its shard of every weight; the full checkpoints passed in are the same as for one
    device (torchtune broadcasts them from rank 0 while loading). Every rank must call this.

    Args: as :func:`build_student`, plus
        custom_sharded_layers (Optional[Iterable[str]]): extra module names to shard on their own (e.g.
            ``tok_embeddings``, ``output``), as torchtune's distributed recipes accept.
        cpu_offload (bool): keep parameters, gradients and optimiser state on the CPU (FSDP2's offload policy).
        reshard_after_forward (bool): free each layer's gathered weights after its forward (FULL_SHARD).
    """
    model = _instantiate(cfg_model, torch.device("meta"), dtype)
    adapter_params = get_adapter_params(model)
    lora = _mark_trainable(model, cfg_model, adapter_params)
    _wrap(model, compile_model=compile_model, activation_checkpointing=activation_checkpointing)
    distributed.shard_decoder(
        model, custom_sharded_layers=custom_sharded_layers, cpu_offload=cpu_offload,
        reshard_after_forward=reshard_after_forward,
    )
    distributed.materialise_buffers(model, device, dtype)
    if lora is not None:
        # Adapters are not in the base checkpoint: give their (sharded) storage a device, then load their values.
        load_device = torch.device("cpu") if cpu_offload else device
        for module in model.modules():
            if hasattr(module, "lora_a"):
                module.to_empty(device=load_device)
        adapters = dict(trainable_state_dict or seeded_init.initial_adapter_state(adapter_params.items(), init_seed, dtype))
        lora_missing, lora_unexpected = training.load_from_full_model_state_dict(
            model, adapters, device, cpu_offload=cpu_offload
        )
        base_missing, base_unexpected = training.load_from_full_model_state_dict(
            model, dict(base_state_dict), device, cpu_offload=cpu_offload
        )
        _init_dora_magnitudes(model, adapter_params, trainable_state_dict)
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=lora.attn_modules,
            apply_lora_to_mlp=lora.apply_to_mlp,
            apply_lora_to_output=lora.apply_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
    else:
        training.load_from_full_model_state_dict(
            model, dict(trainable_state_dict or base_state_dict), device, strict=True, cpu_offload=cpu_offload
        )
    training.validate_no_params_on_meta_device(model)
    _log_student(model, lora, dtype, ", sharded with FSDP2")
    return model, lora


def build_teacher_sharded(
    cfg_model: DictConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    state_dict: Mapping[str, Any],
    custom_sharded_layers: Optional[Iterable[str]] = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """:func:`build_teacher` for data parallelism: meta device, FSDP2 sharding (weights freed after each layer's
    forward unless ``reshard_after_forward=False``), strict load, frozen."""
    model = _instantiate(cfg_model, torch.device("meta"), dtype)
    distributed.shard_decoder(
        model, custom_sharded_layers=custom_sharded_layers, cpu_offload=cpu_offload,
        reshard_after_forward=reshard_after_forward,
    )
    distributed.materialise_buffers(model, device, dtype)
    training.load_from_full_model_state_dict(model, dict(state_dict), device, strict=True, cpu_offload=cpu_offload)
    model.eval().requires_grad_(False)
    training.validate_no_params_on_meta_device(model)
    log.info(f"Teacher model is initialized with precision {dtype}, sharded with FSDP2.")
    return model


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
