"""The recipes' output folder and checkpoint I/O (``torchtune_kd.core.checkpointing``), without running a recipe.

What is the run's is decided by the shared marker (``torchtune_kd.output_folder``), never by a name; a failed
write leaves the last complete save as it was; a save removes only its own temporaries; the resume checks name the
old and the new value.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

from torchtune_kd import output_folder
from torchtune_kd.core import checkpointing, training_state

MARKER = ".torchtune_kd_outputs.json"  # the shared rule's file name, spelled out independently of the module


def check(out: Path, *, epochs: int = 1, resume: bool = False, overwrite: bool = False, **kwargs) -> list[str]:
    return checkpointing.check_output_dir(out, epochs=epochs, resume=resume, overwrite=overwrite, inputs={}, **kwargs)


def recipe_folder(out: Path, *entries: str) -> None:
    """A folder as a finished run of the recipes leaves it: the marker listing ``entries``, each with a file."""
    out.mkdir(parents=True, exist_ok=True)
    for name in entries:
        (out / name).mkdir()
        (out / name / "weights.bin").write_bytes(b"w")
    (out / MARKER).write_text(json.dumps({"format": 1, "owner": "torchtune-kd recipe", "written": list(entries)}))


def fake_state(**changes) -> training_state.TrainingState:
    """A small, complete training state (an epoch end after step 2), with ``changes``."""
    state = training_state.TrainingState(
        seed=0, epochs_run=0, total_epochs=1, max_steps_per_epoch=None, global_step=2, steps_in_epoch=0,
        dataloader=None, samples_in_epoch=0, global_batch=4, world_size=1, lr_schedule_steps=2, optimizer={},
        trainable={"w": torch.zeros(2)}, projections=None, layer_pairs=[], settings={"batch_size": 4},
        loss_scaling={"method": "manual", "scales": {}, "running": {}}, nonfinite_steps=0, rng={},
    )
    return dataclasses.replace(state, **changes)


# ---------------------------------------------------------------------------------------------- output folder


def test_a_users_epoch_folder_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "epoch_0").mkdir(parents=True)
    (out / "epoch_0" / "model.safetensors").write_bytes(b"the user's model")
    for overwrite in (False, True):
        problems = check(out, overwrite=overwrite)
        assert len(problems) == 1, problems
        assert "epoch_0" in problems[0] and "never replaced" in problems[0] and "move it" in problems[0]
    # Past the pre-flight (e.g. the folder filled after it), the save's claim still refuses it.
    folder, removed = checkpointing.claim_output_dir(out, resume=False, overwrite=True)
    assert removed == []
    with pytest.raises(output_folder.OutputFolderError, match="epoch_0"):
        folder.claim("epoch_0")
    assert (out / "epoch_0" / "model.safetensors").read_bytes() == b"the user's model"


def test_a_folder_of_unrelated_files_is_refused_unless_overwrite_adopts_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (problem,) = check(out)
    assert "notes.txt" in problem and "overwrite_output_dir=True" in problem
    assert check(out, overwrite=True) == []
    folder, removed = checkpointing.claim_output_dir(out, resume=False, overwrite=True)
    assert removed == [] and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MARKER).read_text())["owner"] == "torchtune-kd recipe"
    with pytest.raises(output_folder.OutputFolderError):
        folder.claim("notes.txt")


def test_overwrite_removes_only_entries_the_recipe_wrote(tmp_path):
    out = tmp_path / "out"
    recipe_folder(out, "epoch_0", "training_state", "logs")
    (out / "epoch_7").mkdir()  # looks like an export, but the marker does not list it: the user's
    (out / "notes.txt").write_text("mine")
    (out / ".notes.tmp").write_text("mine too")
    folder, removed = checkpointing.claim_output_dir(out, resume=False, overwrite=True)
    assert sorted(p.name for p in removed) == ["epoch_0", "logs", "training_state"]
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmp", MARKER, "epoch_7", "notes.txt"]
    # Only what the new run is about to write is listed: torchtune's copy of its config, claimed before the logger.
    assert folder.written == [checkpointing.CONFIG_COPY]


def test_a_new_run_refuses_an_earlier_runs_outputs_but_not_its_logs(tmp_path):
    out = tmp_path / "out"
    recipe_folder(out, "logs", "training_state")
    assert check(out, side=[out / "logs"]) == []  # training_state holds no complete state: nothing to lose
    checkpointing.save_training_state(fake_state(), out, step=2, keep_last_n=1)
    (problem,) = check(out, side=[out / "logs"])
    assert "already holds another run's outputs (training_state)" in problem
    assert check(out, resume=True) == [] and check(out, overwrite=True) == []


def test_resume_needs_a_folder_the_recipe_wrote(tmp_path):
    out = tmp_path / "out"
    checkpointing.save_training_state(fake_state(), out, step=2, keep_last_n=1)  # e.g. copied without its marker
    for overwrite in (False, True):
        (problem,) = check(out, resume=True, overwrite=overwrite)
        assert problem.startswith("resume_from_checkpoint=True but output_dir=") and MARKER in problem
        assert "training_state" in problem


def test_another_commands_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": 1, "owner": "scripts/prune.py", "written": []}))
    (problem,) = check(out, overwrite=True)
    assert "scripts/prune.py" in problem


def test_the_logger_folder_inside_output_dir_is_the_runs(tmp_path):
    out = tmp_path / "out"
    assert checkpointing.side_entries(out, [out / "logs", out / "prof" / "deep", tmp_path / "elsewhere", out]) == [
        "torchtune_config.yaml", "logs", "prof"]
    out.mkdir()
    (out / "logs").mkdir()  # a user's logs folder where the metric logger would write
    (problem,) = check(out, overwrite=True, side=[out / "logs"])
    assert "holds logs, which this run writes" in problem
    folder, _ = checkpointing.claim_output_dir(tmp_path / "new", resume=False, overwrite=False, side=[tmp_path / "new" / "logs"])
    assert folder.owns("logs")


def test_a_users_file_named_like_torchtunes_config_copy_is_never_replaced(tmp_path):
    # torchtune's metric loggers save the run's config as output_dir/torchtune_config.yaml.
    out = tmp_path / "out"
    out.mkdir()
    (out / "torchtune_config.yaml").write_text("my own config")
    (problem,) = check(out, overwrite=True)
    assert "holds torchtune_config.yaml, which this run writes" in problem
    folder, _ = checkpointing.claim_output_dir(tmp_path / "new", resume=False, overwrite=False)
    assert folder.owns("torchtune_config.yaml")


def test_an_input_inside_a_written_path_is_refused(tmp_path):
    out = tmp_path / "out"
    problems = checkpointing.check_output_dir(out, epochs=1, resume=False, overwrite=True,
                                              inputs={"tokenizer.path": out / "logs" / "tok.model"}, side=[out / "logs"])
    assert any(p.startswith("tokenizer.path=") and "lies inside" in p for p in problems)


# ---------------------------------------------------------------------------------------------- failed writes


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    final, staged = tmp_path / "epoch_0", tmp_path / ".epoch_0.staging"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    staged.mkdir()
    (staged / "new.bin").write_bytes(b"new")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == staged:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        checkpointing.replace_dir(staged, final)
    assert (final / "old.bin").read_bytes() == b"old"
    assert not (tmp_path / ".epoch_0.old").exists()


def test_a_half_written_state_never_replaces_the_last_complete_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    checkpointing.save_training_state(fake_state(global_step=2), out, step=2, keep_last_n=1)

    def disk_full(obj, path):
        Path(path).write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpointing.save_training_state(fake_state(global_step=3), out, step=3, keep_last_n=1)
    monkeypatch.undo()
    assert [step for step, _ in checkpointing.list_training_states(out)] == [2]
    assert checkpointing.load_training_state(checkpointing.latest_training_state(out))["global_step"] == 2
    error = checkpointing.save_failure(OSError(errno.ENOSPC, "No space left on device"), out, "the checkpoint of step 3")
    message = str(error)
    assert f"output_dir={str(out)!r}" in message and "No space left on device" in message
    assert str(out / "training_state" / "step_2") in message and "resume_from_checkpoint=True" in message


def test_an_atomic_save_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.pt"
    checkpointing.atomic_torch_save({"v": torch.ones(2)}, path)

    def disk_full(obj, target):
        Path(target).write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpointing.atomic_torch_save({"v": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == [".state.pt.tmp", "state.pt"]
    assert checkpointing.clean_leftovers(path.parent) == [path.parent / ".state.pt.tmp"]


def test_cleaning_leftovers_removes_only_the_saves_own_temporaries(tmp_path):
    folder, users = tmp_path / "adapters", tmp_path / "users_folder"
    folder.mkdir()
    users.mkdir()
    (users / "keep.txt").write_text("the user's")
    for name in (".epoch_0.staging", ".epoch_1.old"):
        (folder / name).mkdir()
        (folder / name / "adapter_model.pt").write_bytes(b"w")
    (folder / ".adapter_model.pt.tmp").write_bytes(b"half")
    (folder / ".epoch_2.old").symlink_to(users)  # a link is removed, never what it points to
    kept = ["epoch_0", ".hidden", "notes.tmp", "staging", ".epoch_3"]
    for name in kept:
        (folder / name).write_text("mine")
    removed = checkpointing.clean_leftovers(folder, tmp_path / "absent")
    assert sorted(p.name for p in removed) == [".adapter_model.pt.tmp", ".epoch_0.staging", ".epoch_1.old", ".epoch_2.old"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)
    assert (users / "keep.txt").read_text() == "the user's"


def test_only_complete_step_folders_hold_training_states_and_the_newest_are_kept(tmp_path):
    out = tmp_path / "out"
    for step in (1, 2, 3):
        checkpointing.save_training_state(fake_state(global_step=step), out, step=step, keep_last_n=2)
    assert [step for step, _ in checkpointing.list_training_states(out)] == [2, 3]
    root = out / "training_state"
    (root / "recipe_state.pt").write_bytes((root / "step_3" / "recipe_state.pt").read_bytes())  # outside a step folder
    (root / "step_9").mkdir()  # a save that died before its state file was renamed into place
    assert checkpointing.latest_training_state(out) == root / "step_3" / "recipe_state.pt"
    assert checkpointing.clean_incomplete_states(out) == [root / "step_9"]
    assert checkpointing.latest_training_state(tmp_path / "new") is None


def test_non_finite_weights_are_refused_by_name(tmp_path):
    weights = {"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan"), float("inf")]), "ids": torch.arange(3)}
    assert checkpointing.non_finite_tensors(weights) == [("bad", 2)]
    with pytest.raises(checkpointing.CheckpointError, match=r"refusing to save the projections: 1 tensor\(s\).*bad \(2\)"):
        checkpointing.require_finite(weights, "the projections")
    checkpointing.require_finite({"ok": torch.ones(3)}, "the projections")


def test_a_failed_first_save_says_nothing_was_saved(tmp_path):
    message = str(checkpointing.save_failure(PermissionError(errno.EACCES, "Permission denied"), tmp_path, "epoch 0"))
    assert "PermissionError" in message and "No training state had been saved" in message


# ---------------------------------------------------------------------------------------------- resume checks


def test_a_changed_loss_scaling_method_names_both_values(tmp_path):
    path = tmp_path / "recipe_state.pt"
    assert checkpointing.loss_scaling_problem(fake_state(), path, "manual") is None
    message = checkpointing.loss_scaling_problem(fake_state(), path, "dynamic")
    assert "with loss_scaling.method=dynamic" in message and "trained with loss_scaling.method=manual" in message
    assert "Resume with loss_scaling.method=manual" in message and str(path) in message
    blend = checkpointing.loss_scaling_problem(fake_state(), path, "blend")
    assert "loss_scaling.enabled=false" in blend


def test_a_mid_epoch_state_with_another_global_batch_is_named(tmp_path):
    path = tmp_path / "recipe_state.pt"
    state = fake_state(dataloader={"pos": 1}, global_batch=4, world_size=1,
                       settings={"batch_size": 2, "gradient_accumulation_steps": 2})
    same = dict(batch_size=4, gradient_accumulation_steps=1, world_size=1)
    assert checkpointing.global_batch_problem(state, path, **same) is None
    message = checkpointing.global_batch_problem(state, path, batch_size=2, gradient_accumulation_steps=2, world_size=2)
    assert "global batch of 4 samples (batch_size=2 x gradient_accumulation_steps=2 x 1 process(es))" in message
    assert "this run has 2 with 8" in message and "epoch-end" in message
    at_epoch_end = dataclasses.replace(state, dataloader=None)
    assert checkpointing.global_batch_problem(at_epoch_end, path, batch_size=8, gradient_accumulation_steps=1, world_size=1) is None


def test_peeking_a_state_reads_its_settings_and_skips_what_it_cannot_read(tmp_path):
    out = tmp_path / "out"
    assert checkpointing.peek_training_state(out) is None
    path = checkpointing.save_training_state(fake_state(global_step=5), out, step=5, keep_last_n=1)
    state, where = checkpointing.peek_training_state(out)
    assert where == path and state["global_step"] == 5 and state["loss_scaling"]["method"] == "manual"
    path.write_bytes(path.read_bytes()[:100])
    assert checkpointing.peek_training_state(out) is None  # the recipe's own load names the damage


def test_an_lr_schedule_change_states_both_lengths_and_lrs(tmp_path):
    state = fake_state(global_step=3, epochs_run=1, lr_schedule_steps=3)
    assert checkpointing.lr_schedule_change(state, schedule_steps=3, steps_per_epoch=3, ended_lr=0.0, resumed_lr=0.0,
                                            output_dir=tmp_path) is None
    resumed = 3e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))
    message = checkpointing.lr_schedule_change(state, schedule_steps=6, steps_per_epoch=3, ended_lr=0.0,
                                               resumed_lr=resumed, output_dir=tmp_path)
    assert "schedule of 3 steps" in message and "spans 6" in message
    assert f"from 0 (where the run stood after step 3) to {resumed:.6g}" in message
    assert "cannot keep the old schedule" in message and f"checkpoint_dir={tmp_path / 'epoch_0'}" in message
