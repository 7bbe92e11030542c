"""Reliability of the recipe: nothing lost, nothing unsafe, nothing of the user's deleted, divergence stops loudly.

Each test reproduces a defect a careful user hit (issue "Reliability") on the tiny stand-ins (CPU, fp32).
"""

from __future__ import annotations

import logging
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune_kd import tune_cli
from torchtune_kd.core import checkpointing, loss_step, preflight, safety
from torchtune_kd.evaluation import run_logs
from recipe_utils import LORA_OVERRIDES, REPO, load_recipe_module, run_recipe, tiny_config

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
        shutil.copytree(tmp_path / "straight" / "training_state" / f"step_{step}", out / "training_state" / f"step_{step}")
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
    # What a crash between two renames, or during a write, leaves behind.
    (tmp_path / ".epoch_0.old").mkdir(parents=True)
    (tmp_path / ".epoch_0.staging").mkdir()
    (tmp_path / "training_state" / ".step_1").mkdir(parents=True)
    (tmp_path / "training_state" / "step_1").mkdir()
    (tmp_path / "training_state" / "step_1" / ".recipe_state.pt.tmp").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("the user's own file")
    run_recipe(tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=5", "save_every_n_steps=1", "keep_last_n=2"]), RECIPE)
    assert [s for s, _ in checkpointing.list_training_states(tmp_path)] == [4, 5]
    assert not (tmp_path / ".epoch_0.old").exists() and not (tmp_path / ".epoch_0.staging").exists()
    # Hidden names that are not this recipe's temporaries are left alone.
    assert sorted(p.name for p in (tmp_path / "training_state").iterdir()) == [".step_1", "step_4", "step_5"]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


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
    with pytest.raises(checkpointing.CheckpointError, match="training state") as info:
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


def test_a_step_makes_no_host_sync(tiny_assets, assets_root, tmp_path, monkeypatch):
    """Reading a tensor's value on the host (item/float/int/bool/tolist) is a device sync: none inside the step."""
    recipe = setup_recipe(tiny_config(assets_root, tmp_path, ["gradient_accumulation_steps=2", "batch_size=2"]))
    batches = next(recipe._micro_batches())
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    recipe._accumulate_gradients(batches)
    monkeypatch.undo()
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
