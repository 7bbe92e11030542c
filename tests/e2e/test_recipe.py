"""The distillation recipe end to end on the tiny stand-ins (CPU, fp32)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune_kd import tune_cli
from torchtune_kd.evaluation import run_logs
from torchtune_kd.testing.recipes import LORA_OVERRIDES, REPO, load_recipe_module, run_recipe, tiny_config

RECIPE = load_recipe_module()


def finite(values):
    return all(math.isfinite(v) for _, v in values)


@pytest.fixture(scope="module")
def main_run(tiny_assets, assets_root, tmp_path_factory):
    """One 8-step run of the tiny config as shipped: full student, JSD + cosine IR, manual scales, chunked output."""
    out = tmp_path_factory.mktemp("main_run")
    cfg = tiny_config(assets_root, out, ["max_steps_per_epoch=8"])
    recipe = run_recipe(cfg, RECIPE)
    return recipe, out, run_logs.read_disk_log(out / "logs")


def test_metrics_are_logged_by_name_and_finite(main_run):
    _, _, metrics = main_run
    expected = {
        "loss", "ce_loss", "kd_loss", "ir_loss", "ir_loss/0-1", "ir_loss/1-3", "weight/ce", "weight/kd", "weight/ir",
        "grad_norm", "lr", "tokens_per_second", "peak_memory_rss_gib", "kd/top1_agreement", "kd/teacher_entropy",
    }
    assert expected <= set(metrics), expected - set(metrics)
    for name in expected:
        assert len(metrics[name]) == 8 and finite(metrics[name]), name
    # the logged objective is exactly the weighted sum of the logged components
    for i in range(8):
        total = sum(metrics[f"weight/{c}"][i][1] * metrics[f"{c}_loss"][i][1] for c in ("ce", "kd", "ir"))
        assert metrics["loss"][i][1] == pytest.approx(total, rel=1e-5)
    assert [v for _, v in metrics["weight/ce"]] == [0.5] * 8
    # IR is the mean over pairs
    for i in range(8):
        pair_mean = (metrics["ir_loss/0-1"][i][1] + metrics["ir_loss/1-3"][i][1]) / 2
        assert metrics["ir_loss"][i][1] == pytest.approx(pair_mean, rel=1e-5)


def test_loss_goes_down(main_run):
    _, _, metrics = main_run
    losses = [v for _, v in metrics["loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_teacher_is_frozen_and_unchanged(main_run, assets_root):
    recipe, _, _ = main_run
    teacher = recipe._teacher_model
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    from torchtune.models import convert_weights

    hf = load_file(str(assets_root / "teacher" / "model.safetensors"))
    original = convert_weights.hf_to_tune(hf, num_heads=4, num_kv_heads=2, dim=128)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)


def test_projections_trained_saved_and_not_exported(main_run):
    recipe, out, _ = main_run
    projections = recipe._aligner.projections
    assert set(projections) == {"0-1", "1-3"}
    for projection in projections.values():
        assert tuple(projection.weight.shape) == (128, 64)  # sized from the models: student 64 -> teacher 128
    saved = torch.load(out / "projections" / "epoch_0" / "projections.pt", weights_only=True)
    for name, value in recipe._aligner.projections.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][name], value)
    # the projections moved away from their initialisation
    fresh = torch.nn.Linear(64, 128, bias=False)
    assert not torch.allclose(projections["0-1"].weight, fresh.weight)
    export = out / "epoch_0"
    names = {p.name for p in export.iterdir()}
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert not any(n.startswith("adapter") or "projection" in n for n in names), names
    tensors = {}
    for file in export.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    assert not any("proj" in k and "layers" not in k for k in tensors)
    assert not any("lora" in k for k in tensors)


def test_export_loads_in_transformers_with_the_students_logits(main_run):
    from transformers import AutoModelForCausalLM

    recipe, out, _ = main_run
    hf_model = AutoModelForCausalLM.from_pretrained(out / "epoch_0", dtype=torch.float32).eval()
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    student = recipe._model
    student.set_num_output_chunks(0)
    with torch.no_grad():
        ours = student(tokens)
        theirs = hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_unchanged_student_has_untrained_projection_in_state(main_run):
    _, out, _ = main_run
    state = torch.load(out / "training_state" / "step_8" / "recipe_state.pt", weights_only=True)
    assert state["epochs_run"] == 1 and state["global_step"] == 8
    assert set(state["projections"]) == {"0-1.weight", "1-3.weight"}
    assert state["loss_scaling"]["method"] == "manual"


@pytest.mark.parametrize(
    "name, overrides, weights",
    [
        ("lora_dynamic_unchunked", [*LORA_OVERRIDES, "loss_scaling.method=dynamic",
                                    "loss=torch.nn.CrossEntropyLoss", "~loss.num_output_chunks",
                                    "kd_loss=kd_losses.ForwardKLLoss", "~kd_loss.num_output_chunks",
                                    "~kd_loss.lambda_weight"], None),
        ("full_blend_chunked_checkpointing", ["loss_scaling.enabled=false", "kd_ratio=0.25",
                                              "enable_activation_checkpointing=true"], {"ce": 0.75, "kd": 0.25, "ir": 0.0}),
        ("lora_manual_chunked_no_ir", [*LORA_OVERRIDES, "layer_mapping=null", "model.output_hidden_states=false",
                                       "teacher_model.output_hidden_states=false", "loss_scaling.manual_scales.ir=0"],
         {"ce": 0.5, "kd": 0.3}),
    ],
)
def test_variants_run_and_log(tiny_assets, assets_root, tmp_path, name, overrides, weights):
    cfg = tiny_config(assets_root, tmp_path, ["max_steps_per_epoch=3", *overrides])
    recipe = run_recipe(cfg, RECIPE)
    metrics = run_logs.read_disk_log(tmp_path / "logs")
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert len(metrics[key]) == 3 and finite(metrics[key]), key
    if weights is not None:
        for component, weight in weights.items():
            assert [v for _, v in metrics[f"weight/{component}"]] == [weight] * 3
    if "no_ir" in name:
        assert "ir_loss" not in metrics
    else:
        assert finite(metrics["ir_loss"])
    if name.startswith("lora"):
        assert recipe._is_lora
        assert (tmp_path / "adapters" / "epoch_0" / "adapter_model.safetensors").is_file()
        assert not list((tmp_path / "epoch_0").glob("adapter*"))
    if "dynamic" in name:
        # after the first step each weight is scale / running magnitude: contributions near the configured shares
        last = {c: metrics[f"weight/{c}"][-1][1] * metrics[f"{c}_loss"][-1][1] for c in ("ce", "kd", "ir")}
        total = sum(last.values())
        assert last["ce"] / total == pytest.approx(0.5, abs=0.15)
    if "blend" in name:
        # IR is logged but not optimised: the projections do not train
        assert not any(p.requires_grad for p in recipe._aligner.parameters())


def step_gradients(assets_root: Path, out: Path, batch_size: int, accumulation: int, lora: bool):
    overrides = [f"batch_size={batch_size}", f"gradient_accumulation_steps={accumulation}", "shuffle=false"]
    if lora:
        overrides += list(LORA_OVERRIDES)
    cfg = tiny_config(assets_root, out, overrides)
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    if lora:  # give the adapters non-zero B so their gradients are not trivially structured
        torch.manual_seed(0)
        for n, p in recipe._model.named_parameters():
            if "lora_b" in n:
                torch.nn.init.normal_(p, std=0.02)
    batches = next(recipe._micro_batches())
    totals, _ = recipe._accumulate_gradients(batches)
    metrics = {k: float(v) for k, v in totals.items()}
    grads = {n: p.grad.clone() for n, p in recipe._model.named_parameters() if p.requires_grad}
    grads.update({f"proj.{n}": p.grad.clone() for n, p in recipe._aligner.named_parameters()})
    recipe.cleanup()
    return grads, metrics


@pytest.mark.parametrize("lora", [False, True])
def test_accumulation_weights_every_token_equally(tiny_assets, assets_root, tmp_path, lora):
    one_big, m1 = step_gradients(assets_root, tmp_path / "a", 8, 1, lora)
    accumulated, m2 = step_gradients(assets_root, tmp_path / "b", 2, 4, lora)
    assert m1["label_tokens"] == m2["label_tokens"]
    for key in ("ce", "kd", "ir", "loss"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-6)
    assert one_big.keys() == accumulated.keys()
    for name in one_big:
        torch.testing.assert_close(accumulated[name], one_big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_restores_projections_and_optimizer_bit_exactly(tiny_assets, assets_root, tmp_path):
    common = ["max_steps_per_epoch=2", "lr_scheduler=None"]
    first = run_recipe(tiny_config(assets_root, tmp_path, [*common, "epochs=1"]), RECIPE)
    cfg = tiny_config(assets_root, tmp_path, [*common, "epochs=2", "resume_from_checkpoint=true"])
    resumed = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    resumed.setup(cfg=cfg)
    for name, value in first._aligner.projections.state_dict().items():
        assert torch.equal(resumed._aligner.projections.state_dict()[name], value), name
    for name, value in first._model.state_dict().items():
        assert torch.equal(resumed._model.state_dict()[name], value), name
    saved, restored = first._optimizer.state_dict()["state"], resumed._optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for key in saved:
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[key][field], restored[key][field])
    assert resumed.global_step == 2 and resumed.epochs_run == 1
    resumed.cleanup()


def test_resume_without_state_is_a_clear_error(tiny_assets, assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path, ["resume_from_checkpoint=true"])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    with pytest.raises(ValueError, match="resume_from_checkpoint=True but .* holds no training state"):
        recipe.setup(cfg=cfg)
    recipe.cleanup()


def test_bad_config_fails_before_weights_load(tiny_assets, assets_root, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the config was rejected")

    from torchtune.training import FullModelHFCheckpointer

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", no_weights)
    cfg = tiny_config(assets_root, tmp_path, ["layer_mapping=[[0,9]]", "kd_ration=1"])
    with pytest.raises(ValueError, match=r"(?s)kd_ration.*teacher layer 9 is out of range"):
        RECIPE.KDRecipeSingleDevice(cfg=cfg)


def test_tune_run_cli(tiny_assets, assets_root, tmp_path):
    """The documented command line, in a subprocess, with CLI overrides."""
    env = {"KD_ASSETS": str(assets_root), "KD_OUTPUT_DIR": str(tmp_path)}
    result = tune_cli.tune_run(
        "recipes/knowledge_distillation_single_device.py", "configs/tiny_cpu.yaml",
        ["max_steps_per_epoch=2", "metric_logger.log_dir=" + str(tmp_path / "cli_logs")], cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    metrics = run_logs.read_disk_log(tmp_path / "cli_logs")
    assert len(metrics["loss"]) == 2
    assert (tmp_path / "epoch_0" / "config.json").is_file()


def test_compile_matches_eager(tiny_assets, assets_root, tmp_path, monkeypatch):
    """compile: true (torchtune compiles each decoder layer and wraps the loss) trains the same as eager.

    Under ``aot_eager`` (``TORCH_COMPILE_BACKEND``, which torchtune and the recipe read): dynamo's capture and AOT
    autograd of every layer and loss are what the recipe's wiring decides; inductor's C++ code generation for the
    layers would add two minutes on a cold cache and is PyTorch's own to test (the fused pass's per-chunk function is
    compiled with inductor in :func:`test_fused_output_pass_compiles`)."""
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    common = ["max_steps_per_epoch=2", "shuffle=false", "fused_output.enabled=false"]
    run_recipe(tiny_config(assets_root, tmp_path / "eager", common), RECIPE)
    compiled = run_recipe(tiny_config(assets_root, tmp_path / "compiled", [*common, "compile=true"]), RECIPE)
    assert compiled._compile
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled._model.modules())
    # The losses that run in the step were compiled too (dynamo holds compiled code for their functions), not
    # only wrapped: CE whole, the KD loss per chunk.
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import kd_losses

    assert _debug_get_cache_entry_list(kd_losses.Divergence.block_value_and_grad.__code__)
    logits = torch.randn(2, 8, 1280, requires_grad=True)
    ce = compiled._losses.ce_token_sum(list(logits.chunk(4, dim=1)), torch.randint(0, 1280, (2, 8)))
    assert type(ce.grad_fn).__name__ == "CompiledFunctionBackward"
    eager_metrics = run_logs.read_disk_log(tmp_path / "eager" / "logs")
    compiled_metrics = run_logs.read_disk_log(tmp_path / "compiled" / "logs")
    for key in ("loss", "ce_loss", "kd_loss", "ir_loss", "grad_norm"):
        eager_values = [v for _, v in eager_metrics[key]]
        compiled_values = [v for _, v in compiled_metrics[key]]
        assert len(compiled_values) == 2
        assert compiled_values == pytest.approx(eager_values, rel=1e-4), key


@pytest.mark.parametrize("kind", ["full", "lora", "full_blend"])
def test_fused_output_pass_matches_the_unfused_recipe_step_by_step(tiny_assets, assets_root, tmp_path, kind):
    """fused_output: the same run (JSD + cosine IR, dynamic scaling or the kd_ratio blend, accumulation, temperature
    2) without ever materialising either model's logits: the same logged values and the same final weights."""
    scaling = ["loss_scaling.enabled=false", "kd_ratio=0.3"] if kind == "full_blend" else ["loss_scaling.method=dynamic"]
    common = [*(LORA_OVERRIDES if kind == "lora" else []), "max_steps_per_epoch=3", "gradient_accumulation_steps=2",
              *scaling, "kd_loss.temperature=2.0", "seed=4"]
    runs = {}
    for name, extra in (("unfused", ["fused_output.enabled=false"]),
                        ("fused", ["fused_output.enabled=true", "fused_output.chunk_size=100"])):
        out = tmp_path / name
        cfg = tiny_config(assets_root, out, [*common, *extra])
        recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
        recipe.setup(cfg=cfg)
        calls = []
        for model in (recipe._model, recipe._teacher_model):
            model.output.register_forward_hook(lambda *args: calls.append(1))
        recipe.train()
        recipe.cleanup()
        # Fused: neither output projection ever ran as a module (no full logits); unfused: every forward.
        assert (len(calls) == 0) == (name == "fused"), len(calls)
        runs[name] = {k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items()
                      if k not in ("tokens_per_second", "peak_memory_rss_gib")}
    assert runs["fused"].keys() == runs["unfused"].keys()
    for key, values in runs["unfused"].items():
        for step, value in values.items():
            assert runs["fused"][key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "unfused" / "epoch_0" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "fused" / "epoch_0" / "model-00001-of-00001.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fused_output_pass_compiles(tiny_assets, assets_root, tmp_path):
    """compile: true with fused_output compiles the per-chunk computation (dynamo holds code for it) and trains as
    the eager fused pass does."""
    common = ["max_steps_per_epoch=2", "shuffle=false", "fused_output.enabled=true", "fused_output.chunk_size=64"]
    run_recipe(tiny_config(assets_root, tmp_path / "eager", common), RECIPE)
    compiled = run_recipe(tiny_config(assets_root, tmp_path / "compiled", [*common, "compile=true"]), RECIPE)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from torchtune_kd.core import fused_output

    assert compiled._fused_chunk_fn is not None
    assert _debug_get_cache_entry_list(fused_output.chunk_sums_and_grad.__code__)
    eager_metrics = run_logs.read_disk_log(tmp_path / "eager" / "logs")
    compiled_metrics = run_logs.read_disk_log(tmp_path / "compiled" / "logs")
    for key in ("loss", "ce_loss", "kd_loss", "ir_loss", "grad_norm", "kd/top1_agreement"):
        assert [v for _, v in compiled_metrics[key]] == pytest.approx([v for _, v in eager_metrics[key]], rel=1e-4), key
