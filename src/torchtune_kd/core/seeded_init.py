"""Starting values of the weights a checkpoint does not hold (LoRA adapters, projections), from the seed alone.

torchtune initialises LoRA adapters with the global RNG while it builds the model, so their values depend on the
device (CPU and CUDA generators differ), on everything built before them and, under FSDP, on how the model was
sharded. Here each such weight gets its own generator, seeded from the run's seed and the weight's name: the same
seed gives the same starting weights on one device or many, on CPU or GPU, so a distributed run can be checked
against a single-device one and a run can move between them.

The distributions are PyTorch's and torchtune's: LoRA A and projection weights Kaiming-uniform with ``a = sqrt(5)``
(``nn.Linear``'s default), LoRA B zero, biases uniform in ``±1/sqrt(fan_in)``.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Tuple

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """The state-dict name of a parameter (activation-checkpoint and compile wrappers removed)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and ``name``."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(clean_name(name).encode())) % 2**63)


def _kaiming_uniform(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    value = torch.empty(tuple(shape), dtype=torch.float32)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value


def initial_adapter_state(
    named_adapter_params: Iterable[Tuple[str, torch.Tensor]], seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Starting LoRA weights: ``lora_a`` Kaiming-uniform, ``lora_b`` zero (so the student starts as its base model).

    Args:
        named_adapter_params: ``(name, parameter)`` of the adapters (e.g. ``get_adapter_params(model).items()``);
            only names and (global) shapes are read, so meta-device or sharded parameters work. DoRA magnitudes are
            skipped: they are computed from the base weights.
        seed (int): the run's seed.
        dtype (torch.dtype): the dtype of the returned tensors.

    Returns:
        dict[str, torch.Tensor]: state-dict name -> CPU tensor.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in named_adapter_params:
        key = clean_name(name)
        if key.endswith("lora_a.weight"):
            state[key] = _kaiming_uniform(param.shape, generator_for(seed, key)).to(dtype)
        elif key.endswith("lora_b.weight"):
            state[key] = torch.zeros(tuple(param.shape), dtype=dtype)
    return state


@torch.no_grad()
def reset_linear_layers(module: nn.Module, seed: int, *, prefix: str = "") -> None:
    """Re-initialise every ``nn.Linear`` inside ``module`` as ``nn.Linear`` does, from per-name generators."""
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        full = f"{prefix}{name}"
        weight = _kaiming_uniform(child.weight.shape, generator_for(seed, f"{full}.weight"))
        child.weight.copy_(weight.to(child.weight.dtype))
        if child.bias is not None:
            bound = 1 / math.sqrt(child.in_features) if child.in_features > 0 else 0.0
            bias = torch.empty(child.bias.shape).uniform_(-bound, bound, generator=generator_for(seed, f"{full}.bias"))
            child.bias.copy_(bias.to(child.bias.dtype))
