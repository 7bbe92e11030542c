"""Reliability of the recipe: nothing lost, nothing unsafe, nothing of the user's deleted, divergence stops loudly.

Each test reproduces a defect a careful user hit (issue "Reliability") on the tiny stand-ins (CPU, fp32).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune_kd import tune_cli
from torchtune_kd.core import checkpointing, loss_step, preflight, safety
from torchtune_kd.evaluation import run_logs
from torchtune_kd.testing.recipes import LORA_OVERRIDES, REPO, load_recipe_module, run_recipe, tiny_config
from torchtune_kd.testing.host_sync import host_reads

RECIPE = load_recipe_module()
RECIPE_FILE = "recipes/knowledge_distillation_single_device.py"
KIND = {"full": [], "lora": list(LORA_OVERRIDES)}
# Everything a run logs except wall-clock and memory figures, which differ between any two runs.
TIMING = {"tokens_per_second", "peak_memory_rss_gib"}


def setup_recipe(cfg):
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def logged(out: Path) -> dict[str, dict[int, float]]:
    return {k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items() if k not in TIMING}


def run_as_of(src: Path, dst: Path, step: int) -> None:
    """A copy of the run folder ``src`` (marker included) as an interruption right after step ``step``'s checkpoint
    would have left it: newer training states and the logs removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "logs")
    for state, path in checkpointing.list_training_states(dst):
        if state > step:
            shutil.rmtree(path.parent)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------------- 1. LoRA save is read-only


def test_saving_a_lora_student_leaves_the_live_model_unchanged(tiny_assets, assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", *LORA_OVERRIDES])
    recipe = setup_recipe(cfg)
    torch.manual_seed(0)
    for name, param in recipe._model.named_parameters():
        if "lora_b" in name:  # a non-zero adapter: the merge then changes the base weights it is added to
            torch.nn.init.normal_(param, std=0.05)
    before = {k: v.clone() for k, v in recipe._model.state_dict().items()}
    tokens = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    recipe._model.set_num_output_chunks(0)
    with torch.no_grad():
        logits_before = recipe._model(tokens)
    recipe.save_checkpoint(epoch=0)
    after = recipe._model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"save_checkpoint changed {name} of the live model"
    with torch.no_grad():
        assert torch.equal(recipe._model(tokens), logits_before)
    # ... while the export does hold the merged weights W + (alpha / r) B A.
    exported = load_file(str(next((tmp_path / "epoch_0").glob("*.safetensors"))))
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[q_name], before["layers.0.attn.q_proj.weight"])
    recipe.cleanup()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_at_an_epoch_end_equals_the_straight_run(tiny_assets, assets_root, tmp_path, kind):
    common = ["max_steps_per_epoch=3", "lr_scheduler=None", "loss_scaling.method=dynamic", "kd_loss._component_=kd_losses.ReverseKLWithChunkedOutputLoss", "~kd_loss.lambda_weight",
              "ir_loss._component_=kd_losses.MSEIRLoss", "~ir_loss.layer_norm", *KIND[kind]]
    straight = run_recipe(tiny_config(assets_root, tmp_path / "straight", [*common, "epochs=2"]), RECIPE)
    run_recipe(tiny_config(assets_root, tmp_path / "split", [*common, "epochs=1"]), RECIPE)
    resumed = run_recipe(
        tiny_config(assets_root, tmp_path / "split", [*common, "epochs=2", "resume_from_checkpoint=true"]), RECIPE
    )
    assert resumed.global_step == straight.global_step == 6
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "split")
    for key in a:
        assert b[key].keys() == a[key].keys() == set(range(1, 7)), key
        for step in a[key]:
            assert b[key][step] == pytest.approx(a[key][step], rel=1e-6, abs=1e-7), (key, step)
    assert_same_weights(straight._model, resumed._model)
    assert_same_weights(straight._aligner, resumed._aligner)


# ------------------------------------------------------------------------------ mid-epoch checkpoints, resume


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_mid_epoch_resume_reproduces_the_uninterrupted_run(tiny_assets, assets_root, tmp_path, kind):
    """Accumulation 2, dynamic scaling, a checkpoint every 2 steps of 3-step epochs: resume from each one."""
    common = ["max_steps_per_epoch=3", "epochs=2", "batch_size=2", "gradient_accumulation_steps=2",
              "loss_scaling.method=dynamic", "save_every_n_steps=2", "keep_last_n=10", *KIND[kind]]
    straight = run_recipe(tiny_config(assets_root, tmp_path / "straight", common), RECIPE)
    states = [step for step, _ in checkpointing.list_training_states(tmp_path / "straight")]
    assert states == [2, 3, 4, 6]  # mid-epoch 2 and 4 (= step 1 of epoch 2), epoch ends 3 and 6
    reference = logged(tmp_path / "straight")
    for step in (2, 4):
        out = tmp_path / f"from_{step}"
        run_as_of(tmp_path / "straight", out, step)
        resumed = run_recipe(tiny_config(assets_root, out, [*common, "resume_from_checkpoint=true"]), RECIPE)
        values = logged(out)
        for key in reference:
            assert values[key].keys() == set(range(step + 1, 7)), key
            for s, value in values[key].items():
                assert value == pytest.approx(reference[key][s], rel=1e-6, abs=1e-7), (step, key, s)
        assert_same_weights(straight._model, resumed._model)
        assert_same_weights(straight._aligner, resumed._aligner)
        assert resumed._weighting.running == pytest.approx(straight._weighting.running, rel=1e-6)


def test_keep_last_n_prunes_old_states_and_leftovers_are_cleaned(tiny_assets, assets_root, tmp_path):
    out = tmp_path / "out"
    common = ["max_steps_per_epoch=5", "save_every_n_steps=1", "keep_last_n=2"]
    run_recipe(tiny_config(assets_root, out, [*common, "epochs=1"]), RECIPE)
    recipe = setup_recipe(tiny_config(assets_root, out, [*common, "epochs=2", "resume_from_checkpoint=true"]))
    # What a crash between two renames, or during a write, leaves behind in the run's folder ...
    (out / ".epoch_0.old").mkdir()
    (out / ".epoch_0.staging").mkdir()
    (out / "training_state" / ".step_1").mkdir()
    (out / "training_state" / "step_1").mkdir()
    (out / "training_state" / "step_1" / ".recipe_state.pt.tmp").write_bytes(b"half a file")
    # ... and files of the user's that merely look like temporaries.
    (out / "notes.txt").write_text("the user's own file")
    (out / ".notes.tmp").write_text("the user's own file")
    (out / ".staging_photos").mkdir()
    recipe.train()
    recipe.cleanup()
    assert [s for s, _ in checkpointing.list_training_states(out)] == [9, 10]
    assert not (out / ".epoch_0.old").exists() and not (out / ".epoch_0.staging").exists()
    # Hidden names that are not this recipe's temporaries are left alone.
    assert sorted(p.name for p in (out / "training_state").iterdir()) == [".step_1", "step_10", "step_9"]
    for name in ("notes.txt", ".notes.tmp"):
        assert (out / name).read_text() == "the user's own file"
    assert (out / ".staging_photos").is_dir()


@pytest.mark.parametrize("bad", ["keep_last_n=0", "save_every_n_steps=0", "max_nonfinite_steps=-1"])
def test_checkpoint_settings_are_validated(tiny_assets, assets_root, tmp_path, bad):
    cfg = tiny_config(assets_root, tmp_path, [bad])
    with pytest.raises(preflight.ConfigError, match=bad.split("=")[0]):
        preflight.validate_config(cfg)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_exits_cleanly(tiny_assets, assets_root, tmp_path, signum):
    """A preempted run (SIGTERM) or Ctrl-C (SIGINT) finishes its step, writes a resumable checkpoint, says where
    and exits with 128 + the signal number."""
    env = {"KD_ASSETS": str(assets_root), "KD_OUTPUT_DIR": str(tmp_path)}
    process = tune_cli.start_tune_run(
        RECIPE_FILE, "configs/tiny_cpu.yaml", ["max_steps_per_epoch=40", "batch_size=1"], cwd=REPO, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            logs = list((tmp_path / "logs").glob("log_*.txt"))
            if logs and "Step 2 " in logs[0].read_text():
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[0][-3000:]
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, output[-3000:]
    assert f"Received {signal.Signals(signum).name}" in output and "resume_from_checkpoint=True" in output
    assert f"Exiting with status {128 + signum} (128 + {signal.Signals(signum).name})." in output
    assert "Traceback" not in output
    states = checkpointing.list_training_states(tmp_path)
    assert len(states) == 1
    step, path = states[0]
    assert 2 <= step < 40 and str(path.parent) in output
    assert not (tmp_path / "epoch_0").exists()  # the epoch did not finish: no export pretends it did
    state = checkpointing.load_training_state(path)
    assert state["steps_in_epoch"] == step and state["dataloader"] is not None
    # ... and the run resumes from there to the end of its epoch.
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=40", "batch_size=1",
                                              "resume_from_checkpoint=true"])
    resumed = run_recipe(cfg, RECIPE)
    assert resumed.global_step == 40
    assert (tmp_path / "epoch_0" / "config.json").is_file()


# ------------------------------------------------------------------------------------- 2. untrusted state files


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _finished_run(assets_root: Path, out: Path) -> Path:
    run_recipe(tiny_config(assets_root, out, ["max_steps_per_epoch=1"]), RECIPE)
    return checkpointing.latest_training_state(out)


def test_resume_never_unpickles_code_from_the_output_folder(tiny_assets, assets_root, tmp_path):
    path = _finished_run(assets_root, tmp_path)
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "code_ran"
    state["loss_scaling"] = _RunsCode(marker)
    with open(path, "wb") as handle:  # a crafted file, as an attacker would write it
        pickle.dump(state, handle)
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "epochs=2", "resume_from_checkpoint=true"])
    with pytest.raises(checkpointing.CheckpointError, match=str(path)):
        setup_recipe(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_corrupt_or_foreign_training_state_is_a_clear_error(tiny_assets, assets_root, tmp_path, damage):
    path = _finished_run(assets_root, tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save({"model": torch.zeros(3)}, path)
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "epochs=2", "resume_from_checkpoint=true"])
    # A truncated file cannot be read before the weights load, so the recipe's load names it; a readable state of
    # another format is refused by the pre-flight, before anything heavy.
    expected = checkpointing.CheckpointError if damage == "truncated" else preflight.ConfigError
    with pytest.raises(expected, match="training state") as info:
        setup_recipe(cfg)
    assert str(path) in str(info.value)


def test_changed_settings_on_resume(tiny_assets, assets_root, tmp_path, caplog):
    _finished_run(assets_root, tmp_path)
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "epochs=2", "resume_from_checkpoint=true",
                                              "layer_mapping=[[0,2],[1,3]]"])
    with pytest.raises(preflight.ConfigError, match=r"layer_mapping resolves to \[\[0, 2\], \[1, 3\]\].*\[\[0, 1\], \[1, 3\]\]"):
        setup_recipe(cfg)
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "epochs=2", "resume_from_checkpoint=true",
                                              "optimizer.lr=1e-4"])
    with caplog.at_level(logging.WARNING):
        recipe = setup_recipe(cfg)
    assert "optimizer changed since the checkpoint" in caplog.text
    assert recipe._optimizer.param_groups[0]["lr"] != 1e-4  # as the warning says: the checkpoint's is restored
    recipe.cleanup()


# --------------------------------------------------------------------------- 3. divergence stops, never saves NaN


def _poison_student(recipe, at_steps: set[int]) -> None:
    """Make the student's final hidden states NaN during the given (1-based) optimiser steps."""

    def hook(module, inputs, output):
        if recipe.global_step + 1 in at_steps:
            return output * float("nan")
        return output

    recipe._model.norm.register_forward_hook(hook)


def test_a_diverged_run_stops_loudly_and_saves_no_nan(tiny_assets, assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=6", "save_every_n_steps=2"])
    recipe = setup_recipe(cfg)
    _poison_student(recipe, {3})
    with pytest.raises(safety.TrainingDivergedError) as info:
        recipe.train()
    message = str(info.value)
    assert "step 3 (epoch 1)" in message
    for component in ("loss=nan", "ce=nan", "kd=nan"):  # KD is NaN too, not silently 0
        assert component in message
    assert str(tmp_path / "training_state" / "step_2") in message
    assert not (tmp_path / "epoch_0").exists()
    assert [s for s, _ in checkpointing.list_training_states(tmp_path)] == [2]
    state = checkpointing.load_training_state(checkpointing.latest_training_state(tmp_path))
    assert not checkpointing.non_finite_tensors(state["trainable"])
    # The live model did not take the NaN step either.
    assert not checkpointing.non_finite_tensors(recipe._model.state_dict())
    recipe.cleanup()


def test_non_finite_steps_are_skipped_within_the_budget(tiny_assets, assets_root, tmp_path, caplog):
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=4", "max_nonfinite_steps=1"])
    recipe = setup_recipe(cfg)
    _poison_student(recipe, {2})
    with caplog.at_level(logging.WARNING):
        recipe.train()
    assert "Skipping step 2 (epoch 1)" in caplog.text
    assert recipe.global_step == 4 and (tmp_path / "epoch_0" / "config.json").is_file()
    assert not checkpointing.non_finite_tensors(recipe._model.state_dict())
    recipe.cleanup()
    # A second non-finite step exceeds the budget of 1.
    cfg = tiny_config(assets_root, tmp_path / "again", ["max_steps_per_epoch=4", "max_nonfinite_steps=1"])
    recipe = setup_recipe(cfg)
    _poison_student(recipe, {2, 3})
    with pytest.raises(safety.TrainingDivergedError, match="step 3"):
        recipe.train()
    recipe.cleanup()


def test_saving_non_finite_weights_is_refused(tiny_assets, assets_root, tmp_path):
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1"]))
    with torch.no_grad():
        recipe._model.tok_embeddings.weight[3, 5] = float("inf")
    with pytest.raises(checkpointing.CheckpointError, match=r"tok_embeddings.weight \(1\)"):
        recipe.save_checkpoint(epoch=0)
    assert not (tmp_path / "epoch_0").exists() and not checkpointing.list_training_states(tmp_path)
    recipe.cleanup()


# ------------------------------------------------------------------------------------------ 5. output folders


def test_a_new_run_refuses_an_existing_run_unless_asked(tiny_assets, assets_root, tmp_path):
    run_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "epochs=2"]), RECIPE)
    assert (tmp_path / "epoch_1").is_dir()
    with pytest.raises(preflight.ConfigError, match=r"already holds another run's outputs \(epoch_0, epoch_1, projections, training_state\)"):
        setup_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1"]))
    recipe = run_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", "overwrite_output_dir=true"]), RECIPE)
    assert recipe.global_step == 1
    assert not (tmp_path / "epoch_1").exists()  # nothing of the old run is left to mix with the new one
    assert [s for s, _ in checkpointing.list_training_states(tmp_path)] == [1]


def test_an_input_inside_the_output_folder_is_never_replaced(tiny_assets, assets_root, tmp_path):
    teacher = tmp_path / "epoch_0"  # e.g. a merged teacher from the teacher-LoRA workflow
    shutil.copytree(assets_root / "teacher", teacher)
    before = sorted(p.name for p in teacher.iterdir())
    for overwrite in ("false", "true"):
        cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=1", f"teacher_checkpointer.checkpoint_dir={teacher}",
                                                  f"overwrite_output_dir={overwrite}"])
        with pytest.raises(preflight.ConfigError, match=r"teacher_checkpointer.checkpoint_dir=.* lies inside .*epoch_0"):
            setup_recipe(cfg)
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_overwrite_never_touches_files_the_recipe_did_not_write(tiny_assets, assets_root, tmp_path):
    out = tmp_path / "out"
    (out / "epoch_7").mkdir(parents=True)  # named like an export, but the user's
    (out / "notes.txt").write_text("mine")
    (out / ".notes.tmp").write_text("mine")  # named like a temporary
    with pytest.raises(preflight.ConfigError, match=r"holds files torchtune-kd recipe did not write \(\.notes\.tmp, "
                                                    r"epoch_7, notes\.txt\).*overwrite_output_dir=True"):
        setup_recipe(tiny_config(assets_root, out, ["max_steps_per_epoch=1"]))
    assert not (out / ".torchtune_kd_outputs.json").exists()  # refused before anything was written
    overrides = ["max_steps_per_epoch=1", "overwrite_output_dir=true"]
    run_recipe(tiny_config(assets_root, out, overrides), RECIPE)  # adopts the folder: files kept
    (out / "epoch_0" / "mark").write_text("first run")
    run_recipe(tiny_config(assets_root, out, overrides), RECIPE)  # replaces only what the first run wrote
    assert not (out / "epoch_0" / "mark").exists() and (out / "epoch_0" / "config.json").is_file()
    assert (out / "notes.txt").read_text() == "mine" and (out / ".notes.tmp").read_text() == "mine"
    assert (out / "epoch_7").is_dir()


# ---------------------------------------------------------------------------------- a save that cannot be written


@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_a_failed_save_ends_with_a_clear_error_and_keeps_the_last_complete_state(
    tiny_assets, assets_root, tmp_path, monkeypatch, capsys, failure
):
    """The output folder stops accepting writes after the first save. Tests run as root, where a read-only folder
    (chmod) does not block writes, so the failure is injected where the training state is written: nothing (a
    permission error) or half a file (a full disk), as the OS would."""
    out = tmp_path / "out"
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith(".recipe_state.pt.tmp"):
            calls.append(path)
            if len(calls) > 1:
                if failure == "read-only":
                    raise PermissionError(13, "Permission denied", str(path))
                Path(path).write_bytes(b"half a state")
                raise OSError(28, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    overrides = ["max_steps_per_epoch=4", "save_every_n_steps=1"]
    tiny_config(assets_root, out)  # sets KD_ASSETS for the config file
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(sys, "argv", ["recipe", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={out}",
                                      *overrides])
    with pytest.raises(SystemExit) as info:
        RECIPE.recipe_main()
    assert info.value.code == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    reason = ("PermissionError: [Errno 13] Permission denied" if failure == "read-only"
              else "OSError: [Errno 28] No space left on device")
    assert (
        f"Error: could not save the checkpoint of step 2 (epoch 0, mid-epoch) into output_dir={str(out)!r} ({reason}"
    ) in error, error
    assert f"the newest complete training state, {str(out / 'training_state' / 'step_1')!r}, is intact" in error
    assert "Make output_dir writable again" in error and "resume_from_checkpoint=True" in error
    # The last complete save is whole, and the run resumes from it once the folder accepts writes again.
    monkeypatch.undo()
    assert [step for step, _ in checkpointing.list_training_states(out)] == [1]
    assert checkpointing.load_training_state(checkpointing.latest_training_state(out))["global_step"] == 1
    resumed = run_recipe(tiny_config(assets_root, out, [*overrides, "resume_from_checkpoint=true"]), RECIPE)
    assert resumed.global_step == 4 and (out / "epoch_0" / "config.json").is_file()


# ------------------------------------------------------------------- resume: refused before heavy work, or warned


def test_resume_refuses_a_changed_scaling_method_or_global_batch_before_any_model_loads(
    tiny_assets, assets_root, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    common = ["max_steps_per_epoch=3", "save_every_n_steps=2", "keep_last_n=2"]
    run_recipe(tiny_config(assets_root, out, common), RECIPE)
    shutil.rmtree(out / "training_state" / "step_3")  # as if stopped after step 2's mid-epoch checkpoint
    state = out / "training_state" / "step_2" / "recipe_state.pt"

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the resume was refused")

    from torchtune.training import FullModelHFCheckpointer

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", no_weights)
    resume = [*common, "resume_from_checkpoint=true"]
    with pytest.raises(preflight.ConfigError, match=(
        rf"with loss_scaling.method=dynamic, but the training state '{re.escape(str(state))}' was trained with "
        r"loss_scaling.method=manual: .* Resume with loss_scaling.method=manual")):
        setup_recipe(tiny_config(assets_root, out, [*resume, "loss_scaling.method=dynamic"]))
    with pytest.raises(preflight.ConfigError, match=(
        rf"the training state '{re.escape(str(state))}' was saved mid-epoch by a run on 1 process\(es\) with a global batch of 4 "
        r"samples \(batch_size=4 x gradient_accumulation_steps=1 x 1 process\(es\)\); this run has 1 with 2")):
        setup_recipe(tiny_config(assets_root, out, [*resume, "batch_size=2"]))
    # A state the pre-flight cannot read cheaply is checked again by the recipe, still before any weights load.
    monkeypatch.setattr(checkpointing, "peek_training_state", lambda output_dir: None)
    cfg = tiny_config(assets_root, out, [*resume, "loss_scaling.enabled=false", "kd_ratio=0.5"])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    with pytest.raises(preflight.ConfigError, match=r"with loss_scaling.enabled=false \(the kd_ratio blend\), but the "
                                                    r"training state .* was trained with loss_scaling.method=manual"):
        recipe.setup(cfg=cfg)


def test_extending_a_finished_run_warns_that_the_lr_schedule_changes(tiny_assets, assets_root, tmp_path, caplog):
    """epochs=1 then epochs=2 with a cosine schedule (3e-3, 2 warm-up steps, 3 steps per epoch): the first run's lr
    ends at 0; the resumed run follows a 6-step cosine from step 3 on."""
    out = tmp_path / "out"
    common = ["max_steps_per_epoch=3", "optimizer.lr=3e-3", "lr_scheduler.num_warmup_steps=2"]
    run_recipe(tiny_config(assets_root, out, [*common, "epochs=1"]), RECIPE)
    ended = logged(out)["lr"][3]
    assert ended == 0.0
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_config(assets_root, out, [*common, "epochs=2", "resume_from_checkpoint=true"]), RECIPE)

    def cosine(step: int, total: int) -> float:  # torchtune's warm-up + half cosine, written out
        return 3e-3 * (step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2))))

    resumed_at = cosine(3, 6)
    assert resumed_at == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert (
        f"the learning-rate schedule changes on resume: the checkpoint was trained with a schedule of 3 steps, this "
        f"run's spans 6 (epochs x steps per epoch), so the lr jumps from {ended:.6g} (where the run stood after step 3) "
        f"to {resumed_at:.6g}"
    ) in caplog.text
    assert "cannot keep the old schedule" in caplog.text and f"checkpoint_dir={out / 'epoch_0'}" in caplog.text
    lr = logged(out)["lr"]  # logged after each step's scheduler step: the lr of the next step
    for step in (4, 5, 6):
        assert lr[step] == pytest.approx(cosine(step, 6), abs=1e-12), step


def test_config_errors_reach_the_user_as_one_clean_block(tiny_assets, assets_root, tmp_path):
    env = {"KD_ASSETS": str(assets_root), "KD_OUTPUT_DIR": str(tmp_path)}
    result = tune_cli.tune_run(
        RECIPE_FILE, "configs/tiny_cpu.yaml", ["layer_mapping=[[0,9]]", "batch_size=0"], cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout
    assert "problem(s) in the config" in result.stdout and "batch_size=0" in result.stdout
    assert "teacher layer 9 is out of range" in result.stdout
    assert "resolved config" not in result.stdout  # no config dump before the verdict


# --------------------------------------------------------------------------------- 6, 7, 10: the step's numbers


def test_top1_agreement_is_a_fraction_of_counted_tokens(tiny_assets, assets_root, tmp_path):
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["batch_size=4", "layer_mapping=null", "loss_scaling.manual_scales.ir=0",
                                                              "model.output_hidden_states=false", "teacher_model.output_hidden_states=false"]))
    batches = next(recipe._micro_batches())
    totals, _ = recipe._accumulate_gradients(batches)
    # Independent count: full (unchunked) logits of both models, argmax equality over counted next-token targets.
    recipe._model.set_num_output_chunks(0)
    recipe._teacher_model.set_num_output_chunks(0)
    agree = counted = 0
    with torch.no_grad():
        for batch in batches:
            student, teacher = recipe._model(batch["tokens"]), recipe._teacher_model(batch["tokens"])
            keep = batch["labels"][:, 1:] != -100
            same = student[:, :-1].argmax(-1) == teacher[:, :-1].argmax(-1)
            agree += int((same & keep).sum())
            counted += int(keep.sum())
    assert counted > 100
    assert float(totals["agree"]) == pytest.approx(agree / counted, abs=1e-6)
    assert int(totals["label_tokens"]) == counted
    recipe.cleanup()


def test_ir_mask_comes_from_the_collator_not_token_values():
    from torchtune.data import padded_collate_packed, padded_collate_sft
    from functools import partial

    eos = 7  # pad id == eos: token values cannot tell padding from a real final eos
    samples = [{"tokens": [1, 5, eos], "labels": [1, 5, eos]}, {"tokens": [1, eos], "labels": [-100, eos]}]
    batch = loss_step.collate_with_real_tokens(
        samples, partial(padded_collate_sft, padding_idx=eos, ignore_idx=-100), packed=False
    )
    assert batch["real_tokens"].tolist() == [[True, True, True], [True, True, False]]
    # A pack of two samples (the second with token 0 inside) padded with 0 to max_seq_len 8, and a full pack.
    pack = {"tokens": torch.tensor([1, 5, 0, 0, 0, 0, 0, 0]), "labels": torch.tensor([1, 5, 0, -100, -100, -100, -100, -100]),
            "input_pos": torch.arange(8), "seq_lens": torch.tensor([2, 1, 5])}
    pack["labels"][2] = -100
    full = {"tokens": torch.tensor([1, 0, 0, 2, 2, 2, 2, 0]), "labels": torch.full((8,), -100),
            "input_pos": torch.arange(8), "seq_lens": torch.tensor([3, 5])}
    batch = loss_step.collate_with_real_tokens([pack, full], padded_collate_packed, packed=True)
    assert batch["real_tokens"].tolist() == [[True] * 3 + [False] * 5, [True] * 8]


def test_packed_run_masks_pack_padding_for_ir(tiny_assets, assets_root, tmp_path):
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["dataset.packed=true", "tokenizer.max_seq_len=256"]))
    batch = next(recipe._micro_batches())[0]
    real = batch["real_tokens"]
    assert real.shape == batch["tokens"].shape and not real.all()  # the tiny packs end in padding
    padded = ~real
    assert (batch["tokens"][padded] == 0).all() and (batch["labels"][padded] == -100).all()
    totals, _ = recipe._accumulate_gradients([batch])
    assert torch.isfinite(totals["ir"])
    recipe.cleanup()


@pytest.mark.parametrize(
    "extra", [["fused_output.enabled=false"], ["fused_output.enabled=true", "fused_output.chunk_size=16"], []],
    ids=["unfused", "fused", "default"],
)
def test_a_step_makes_no_host_sync(tiny_assets, assets_root, tmp_path, extra):
    """Reading a tensor's value on the host (item/float/int/bool/tolist) is a device sync: none inside the step."""
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["gradient_accumulation_steps=2", "batch_size=2", *extra]))
    assert recipe._output_pass.fused is (extra != ["fused_output.enabled=false"])
    batches = next(recipe._micro_batches())
    with host_reads() as reads:
        recipe._accumulate_gradients(batches)
    assert reads == []
    recipe.cleanup()


def test_a_step_with_every_label_ignored_warns(tiny_assets, assets_root, tmp_path, caplog):
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=2"]))
    original = recipe._micro_batches

    def no_labels():
        for batches in original():
            for batch in batches:
                batch["labels"].fill_(-100)
            yield batches

    recipe._micro_batches = no_labels
    with caplog.at_level(logging.WARNING):
        recipe.train()
    assert "every label of the step is ignored" in caplog.text
    recipe.cleanup()
