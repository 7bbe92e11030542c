"""The training-state format (``torchtune_kd.core.training_state``): built, written, read back and checked in one place.

A state of another format (newer, unknown or none recorded), a state missing a field and a file that would run code
when unpickled are refused, each with a message naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
import torch
from torchtune import training

from torchtune_kd.core import checkpointing, training_state
from torchtune_kd.errors import CheckpointError, ConfigError


def full_state(**changes) -> training_state.TrainingState:
    """A state with a distinct value in every field (tensors where the recipe stores tensors)."""
    state = training_state.TrainingState(
        seed=1234,
        epochs_run=1,
        total_epochs=3,
        max_steps_per_epoch=7,
        global_step=9,
        steps_in_epoch=2,
        dataloader={"_num_yielded": 4, "_sampler_iter_state": {"yielded": 4}},
        samples_in_epoch=16,
        global_batch=8,
        world_size=2,
        lr_schedule_steps=21,
        optimizer={"state": {0: {"step": torch.tensor(9.0), "exp_avg": torch.arange(4.0)}},
                   "param_groups": [{"lr": 3e-4, "params": [0]}]},
        trainable={"layers.0.attn.q_proj.lora_a.weight": torch.randn(2, 4)},
        projections={"0.weight": torch.randn(3, 2)},
        layer_pairs=[(0, 1), (1, 3)],
        settings={"batch_size": 2, "gradient_accumulation_steps": 2, "optimizer": {"lr": 3e-4}},
        loss_scaling={"method": "dynamic", "scales": {"ce": 1.0, "kd": 1.0}, "running": {"ce": 2.5}},
        nonfinite_steps=1,
        rng={"cpu": torch.get_rng_state(), "cuda": None},
    )
    return dataclasses.replace(state, **changes)


def same(a, b) -> bool:
    """Deep equality with tensors compared by value."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def written(tmp_path: Path, stored: dict) -> Path:
    """``stored`` saved where a recipe saves its states, as is (no format added)."""
    path = tmp_path / "out" / "training_state" / "step_9" / "recipe_state.pt"
    path.parent.mkdir(parents=True)
    torch.save(stored, path)
    return path


def test_every_field_survives_a_save_and_a_read(tmp_path):
    state = full_state()
    path = checkpointing.save_training_state(state, tmp_path, step=9, keep_last_n=1)
    stored = torch.load(path, weights_only=True)
    assert list(stored) == [*training_state.KEYS, "format"] and stored["format"] == training_state.STATE_FORMAT
    back = training_state.read(path)
    for name in training_state.KEYS:
        assert same(getattr(back, name), getattr(state, name)), name
    assert back.layer_pairs == [[0, 1], [1, 3]]
    resumed, where = checkpointing.load_latest_training_state(tmp_path)
    assert where == path and resumed.global_step == 9 and same(resumed.trainable, state.trainable)


def test_torchtunes_own_key_names_are_kept():
    for name in (training.SEED_KEY, training.EPOCHS_KEY, training.TOTAL_EPOCHS_KEY, training.MAX_STEPS_KEY, training.OPT_KEY):
        assert name in training_state.KEYS


@pytest.mark.parametrize("found", [training_state.STATE_FORMAT + 1, 99])
def test_a_newer_format_is_refused_naming_file_format_and_fix(tmp_path, found):
    path = written(tmp_path, {**full_state().as_dict(), "format": found})
    with pytest.raises(CheckpointError) as info:
        training_state.read(path)
    message = str(info.value)
    assert str(path) in message and f"has format {found}, newer than format {training_state.STATE_FORMAT}" in message
    assert "resume with the torchtune-kd version that wrote it, or start a new run" in message


@pytest.mark.parametrize("found", [1, 0, "2", 2.0, True])
def test_an_unknown_format_is_refused(tmp_path, found):
    path = written(tmp_path, {**full_state().as_dict(), "format": found})
    with pytest.raises(CheckpointError, match=re.escape(f"has format {found!r}, unknown to this version")) as info:
        checkpointing.load_training_state(path)
    assert str(path) in str(info.value) and "start a new run (a new output_dir)" in str(info.value)


def test_a_state_without_a_format_is_refused(tmp_path):
    stored = full_state().as_dict()
    del stored["format"]
    path = written(tmp_path, stored)
    with pytest.raises(CheckpointError) as info:
        training_state.read(path)
    message = str(info.value)
    assert str(path) in message and "records no format" in message and "start a new run" in message


@pytest.mark.parametrize("key", ["global_step", "rng", "lr_schedule_steps", "samples_in_epoch"])
def test_a_state_missing_a_field_is_refused_by_name(tmp_path, key):
    stored = full_state().as_dict()
    del stored[key]
    path = written(tmp_path, stored)
    with pytest.raises(CheckpointError) as info:
        training_state.read(path)
    assert str(path) in str(info.value) and f"missing [{key!r}]" in str(info.value)
    assert "Start a new run or point output_dir at the run to resume" in str(info.value)


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: what a crafted state file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_file_that_would_run_code_is_never_unpickled(tmp_path, writer):
    marker = tmp_path / "code_ran"
    stored = {**full_state().as_dict(), "loss_scaling": _RunsCode(marker)}
    path = tmp_path / "out" / "training_state" / "step_9" / "recipe_state.pt"
    path.parent.mkdir(parents=True)
    if writer == "pickle":
        path.write_bytes(pickle.dumps(stored, protocol=2))
    else:
        torch.save(stored, path)
    with pytest.raises(CheckpointError, match="cannot load the training state .* safely") as info:
        training_state.read(path)
    assert str(path) in str(info.value) and "Delete this step_* folder" in str(info.value)
    assert training_state.peek(path) is None
    assert not marker.exists()


def test_nothing_to_resume_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{str(tmp_path / 'training_state')!r} holds no training state")):
        checkpointing.load_latest_training_state(tmp_path)


def test_the_preflights_peek_reads_a_newer_state_so_that_its_format_is_named(tmp_path):
    path = written(tmp_path, {**full_state().as_dict(), "format": training_state.STATE_FORMAT + 1})
    stored, where = checkpointing.peek_training_state(tmp_path / "out")
    assert where == path
    problems = training_state.resume_problems(
        stored, path, scaling_method="manual", batch_size=1, gradient_accumulation_steps=1, world_size=1
    )
    assert len(problems) == 1 and "newer than format" in problems[0] and str(path) in problems[0]
    # The single checks have nothing to compare in a state of another format.
    assert training_state.loss_scaling_problem(stored, path, "manual") is None
    assert training_state.global_batch_problem(stored, path, batch_size=1, gradient_accumulation_steps=1,
                                               world_size=1) is None


def test_resume_problems_name_a_changed_method_and_global_batch(tmp_path):
    path = tmp_path / "recipe_state.pt"
    state = full_state()
    same_run = dict(batch_size=2, gradient_accumulation_steps=2, world_size=2)
    assert training_state.resume_problems(state, path, scaling_method="dynamic", **same_run) == []
    problems = training_state.resume_problems(state, path, scaling_method="manual", batch_size=2,
                                              gradient_accumulation_steps=1, world_size=2)
    assert len(problems) == 2
    assert "trained with loss_scaling.method=dynamic" in problems[0]
    assert "global batch of 8 samples (batch_size=2 x gradient_accumulation_steps=2 x 2 process(es))" in problems[1]
    # Settings that are themselves invalid (None) are not compared.
    assert training_state.resume_problems(state, path, scaling_method=None, batch_size=None,
                                          gradient_accumulation_steps=None, world_size=1) == []


def test_the_resume_position_follows_the_world_size(tmp_path):
    state = full_state()
    kwargs = dict(batch_size=2, gradient_accumulation_steps=2)
    assert training_state.resume_position(state, tmp_path, world_size=2, **kwargs) is state.dataloader
    # Another world size with the same global batch: the position in samples, split over the ranks.
    assert training_state.resume_position(state, tmp_path, world_size=1, batch_size=4, gradient_accumulation_steps=2) == {
        training_state.SAMPLER_POSITION: 16}
    assert training_state.resume_position(dataclasses.replace(state, dataloader=None), tmp_path, world_size=1,
                                          **kwargs) is None
    with pytest.raises(ConfigError, match=r"global batch of 8 samples.*this run has 1 with 4"):
        training_state.resume_position(state, tmp_path, world_size=1, **kwargs)


def test_a_changed_layer_mapping_is_refused_and_other_settings_warned(tmp_path):
    from omegaconf import OmegaConf

    state = full_state()
    cfg = OmegaConf.create({"optimizer": {"lr": 1e-4}, "batch_size": 2, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match=re.escape("layer_mapping resolves to [[0, 2]] but the checkpoint in")):
        training_state.check_resumed_settings(cfg, state, [(0, 2)], tmp_path)
    warnings = training_state.check_resumed_settings(cfg, state, [(0, 1), (1, 3)], tmp_path)
    assert len(warnings) == 1 and warnings[0].startswith("optimizer changed since the checkpoint ({'lr': 0.0003} -> ")
    assert training_state.resume_settings(cfg)["optimizer"] == {"lr": 1e-4}
