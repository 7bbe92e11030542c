"""Starting values of LoRA adapters and projections depend on the seed and the weight's name only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchtune.models.llama3 import lora_llama3
from torchtune.modules.peft import get_adapter_params

from torchtune_kd.core import seeded_init


def tiny_lora(device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return lora_llama3(
            lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, vocab_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, embed_dim=32, max_seq_len=16, lora_rank=4, lora_alpha=8,
        )


def test_adapters_do_not_depend_on_the_global_rng_or_the_device():
    torch.manual_seed(0)
    first = seeded_init.initial_adapter_state(get_adapter_params(tiny_lora()).items(), seed=7, dtype=torch.float32)
    torch.manual_seed(123)
    torch.randn(1000)
    second = seeded_init.initial_adapter_state(get_adapter_params(tiny_lora()).items(), seed=7, dtype=torch.float32)
    on_meta = seeded_init.initial_adapter_state(get_adapter_params(tiny_lora("meta")).items(), seed=7, dtype=torch.float32)
    assert first.keys() == second.keys() == on_meta.keys()
    for name in first:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], on_meta[name]), name


def test_adapters_follow_torchtune_distributions():
    state = seeded_init.initial_adapter_state(get_adapter_params(tiny_lora()).items(), seed=1, dtype=torch.float64)
    a_names = [n for n in state if n.endswith("lora_a.weight")]
    b_names = [n for n in state if n.endswith("lora_b.weight")]
    assert a_names and len(a_names) == len(b_names)
    for name in b_names:
        assert not state[name].any(), name  # LoRA B = 0: the student starts as its base model
    values = torch.cat([state[n].flatten() for n in a_names if state[n].shape[1] == 32])
    bound = 1 / math.sqrt(32)  # kaiming_uniform with a = sqrt(5): gain sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in)
    assert values.abs().max() <= bound
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # Distinct names get distinct draws; a different seed gives different values.
    assert not torch.equal(state[a_names[0]], state[a_names[1]])
    other = seeded_init.initial_adapter_state(get_adapter_params(tiny_lora()).items(), seed=2, dtype=torch.float64)
    assert not torch.equal(state[a_names[0]], other[a_names[0]])


def test_wrapper_prefixes_do_not_change_the_names():
    assert seeded_init.clean_name("layers.0._checkpoint_wrapped_module.attn.q_proj.lora_a.weight") == (
        "layers.0.attn.q_proj.lora_a.weight"
    )
    g1 = seeded_init.generator_for(3, "layers.0._orig_mod.attn.q_proj.lora_a.weight")
    g2 = seeded_init.generator_for(3, "layers.0.attn.q_proj.lora_a.weight")
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_linear_layers_reset_like_nn_linear_from_their_names():
    def build(global_seed: int) -> nn.ModuleDict:
        torch.manual_seed(global_seed)
        module = nn.ModuleDict({"0-1": nn.Linear(16, 24, bias=True), "1-3": nn.Linear(16, 24, bias=False)})
        seeded_init.reset_linear_layers(module, seed=5, prefix="projections.")
        return module

    a, b = build(0), build(99)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a["0-1"].weight.abs().max() <= 1 / math.sqrt(16)
    assert a["0-1"].bias.abs().max() <= 1 / math.sqrt(16)
    assert not torch.equal(a["0-1"].weight, a["1-3"].weight)
