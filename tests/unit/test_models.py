"""Building the student (LoRA: adapters train; full: everything trains) and the frozen teacher on tiny CPU models."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config

from torchtune_kd.core import models
from torchtune_kd.testing import standins

SHAPE = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
             max_seq_len=16)
FULL = {"_component_": "torchtune.models.llama3.llama3", **SHAPE}
LORA = {"_component_": "torchtune.models.llama3.lora_llama3", **SHAPE, "lora_attn_modules": ["q_proj", "v_proj"],
        "apply_lora_to_mlp": True, "lora_rank": 4, "lora_alpha": 8.0}
CPU = dict(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    """A plain tiny Llama's weights (what a checkpointer loads), non-default so a skipped load shows."""
    with torch.random.fork_rng(devices=[]):
        model = tt_config.instantiate(OmegaConf.create(FULL))
    standins.init_small_(model, seed=11)
    return {k: v.clone() for k, v in model.state_dict().items()}


def student(cfg: dict, checkpoint, **kwargs):
    return models.build_student(OmegaConf.create(cfg), base_state_dict=checkpoint, **CPU, **kwargs)


def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_a_lora_student_trains_only_its_adapters_on_the_checkpoints_weights(checkpoint):
    model, lora = student(LORA, checkpoint)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in name or ".lora_b." in name for name in trainable)
    assert trainable == set(adapters(model))
    assert (lora.rank, lora.alpha, lora.attn_modules, lora.apply_to_mlp, lora.apply_to_output) == (
        4, 8.0, ["q_proj", "v_proj"], True, False)
    state = model.state_dict()
    for name, value in checkpoint.items():
        assert torch.equal(state[name], value), name


def test_a_full_student_trains_every_weight(checkpoint):
    model, lora = student(FULL, checkpoint)
    assert lora is None
    assert all(p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[name]), name


def test_fresh_adapters_depend_on_the_seed_only(checkpoint):
    torch.manual_seed(0)
    first = adapters(student(LORA, checkpoint, init_seed=3)[0])
    torch.manual_seed(99)  # the global RNG plays no part
    again = adapters(student(LORA, checkpoint, init_seed=3)[0])
    other = adapters(student(LORA, checkpoint, init_seed=4)[0])
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    a_names = [k for k in first if "lora_a" in k]
    assert any(not torch.equal(first[k], other[k]) for k in a_names)
    # B starts at zero: a fresh LoRA student computes exactly what the checkpoint computes.
    assert all(not first[k].any() for k in first if "lora_b" in k)


def test_a_resumed_trainable_state_replaces_the_fresh_adapters(checkpoint):
    fresh = adapters(student(LORA, checkpoint)[0])
    resumed_state = {k: torch.full_like(v, 0.5) for k, v in fresh.items()}
    resumed = adapters(student(LORA, checkpoint, trainable_state_dict=resumed_state)[0])
    assert all(torch.equal(resumed[k], resumed_state[k]) for k in fresh)


def test_a_resumed_full_student_takes_the_training_states_weights(checkpoint):
    trained = {k: v + 1.0 for k, v in checkpoint.items()}
    model, _ = student(FULL, checkpoint, trainable_state_dict=trained)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_the_teacher_is_frozen_in_eval_mode_with_the_checkpoints_weights(checkpoint):
    teacher = models.build_teacher(OmegaConf.create(FULL), state_dict=checkpoint, **CPU)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, checkpoint[k]) for k, v in teacher.state_dict().items())


def test_the_teacher_refuses_a_checkpoint_with_missing_weights(checkpoint):
    partial = {k: v for k, v in checkpoint.items() if k != "output.weight"}
    with pytest.raises(RuntimeError, match="output.weight"):
        models.build_teacher(OmegaConf.create(FULL), state_dict=partial, **CPU)


def test_the_hidden_states_flag_is_ours_and_never_reaches_the_builder(checkpoint):
    plain, flag = models.model_config_without_flag(OmegaConf.create({**FULL, models.HIDDEN_STATES_FLAG: True}))
    assert flag is True and models.HIDDEN_STATES_FLAG not in plain and plain["num_layers"] == 2
    assert models.model_config_without_flag(OmegaConf.create(FULL))[1] is False
    # Both builders accept a section carrying the flag (torchtune's builder would reject the unknown kwarg).
    flagged = {**FULL, models.HIDDEN_STATES_FLAG: True}
    models.build_teacher(OmegaConf.create(flagged), state_dict=checkpoint, **CPU)
    student(flagged, checkpoint)
