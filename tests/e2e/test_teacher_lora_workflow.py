"""The seed's "3B-LoRA -> 1B" workflow end to end on the tiny stand-ins.

torchtune's own lora_finetune_single_device fine-tunes the teacher and writes merged weights (with adapter files
beside them); our recipe distils from that merged teacher; the student's export is clean and lm-eval scores it
offline.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from torchtune_kd import tune_cli
from torchtune_kd.evaluation import lm_eval_runner, tables
from torchtune_kd.testing.recipes import REPO, load_recipe_module, run_recipe, tiny_config


def test_teacher_lora_then_distil_then_export_then_lm_eval(tiny_assets, assets_root, tmp_path):
    teacher_out = tmp_path / "teacher_lora"
    env = {"KD_ASSETS": str(assets_root), "KD_TEACHER_OUTPUT_DIR": str(teacher_out)}
    result = tune_cli.tune_run(
        "lora_finetune_single_device", "configs/teacher/lora_tiny.yaml", ["max_steps_per_epoch=3"],
        cwd=REPO, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    merged_dir = teacher_out / "epoch_0"
    merged_file = merged_dir / "model-00001-of-00001.safetensors"
    assert merged_file.is_file()
    # torchtune leaves the adapter beside the merged weights: exactly what must never reach lm-eval with peft around
    assert (merged_dir / "adapter_model.safetensors").is_file()

    original = load_file(str(Path(tiny_assets["teacher_dir"]) / "model.safetensors"))
    merged = load_file(str(merged_file))
    changed = [k for k in original if not torch.equal(original[k], merged[k])]
    assert any("q_proj" in k for k in changed)  # the LoRA deltas were merged in

    out = tmp_path / "distil"
    cfg = tiny_config(assets_root, out, [
        "max_steps_per_epoch=2",
        f"teacher_checkpointer.checkpoint_dir={merged_dir}",
        "teacher_checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
    ])
    recipe = run_recipe(cfg, load_recipe_module())
    # the teacher in use is the merged, fine-tuned one
    from torchtune.models import convert_weights

    expected = convert_weights.hf_to_tune(merged, num_heads=4, num_kv_heads=2, dim=128)
    for name, value in recipe._teacher_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

    export = out / "epoch_0"
    assert not list(export.glob("adapter*"))
    results, rows = lm_eval_runner.evaluate_models({"distilled": export}, tmp_path / "eval", data="offline", limit=2,
                                                   batch_size=4, device="cpu")
    for task, metric in (("truthfulqa_mc2", "acc"), ("hellaswag", "acc_norm"), ("commonsense_qa", "acc")):
        value, stderr = tables.extract_metric(results["distilled"], task, metric)
        assert 0.0 <= value <= 1.0
