"""On-policy distillation through the whole recipe on the tiny stand-ins (LoRA and full students each time).

- ``fraction: 0`` is today's recipe step for step;
- a run on the student's own samples logs the ``on_policy/*`` metrics by name, trains no CE on those steps and keeps
  it on the others;
- with the samples fixed (greedy), gradient accumulation and the fused pass give the unaccumulated, unfused steps;
- a run resumed mid-epoch samples and trains exactly what the uninterrupted run did;
- two gloo processes equal one on the same global batch (greedy samples).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from torchtune_kd.core import checkpointing
from torchtune_kd.evaluation import run_logs
from torchtune_kd.testing.recipes import (
    LORA_OVERRIDES, load_recipe_module, run_distributed_config, run_recipe, tiny_config,
)

RECIPE = load_recipe_module()
KIND = {"full": [], "lora": list(LORA_OVERRIDES)}
TIMING = {"tokens_per_second", "tokens_per_second_per_gpu", "peak_memory_rss_gib"}
# Data with a prompt part (alpaca's instruction), short samples, every step logged.
COMMON = ["dataset.train_on_input=False", "log_every_n_steps=1", "max_steps_per_epoch=3", "seed=5"]
GREEDY = ["on_policy.fraction=1.0", "on_policy.max_new_tokens=12", "on_policy.top_k=1"]


def logged(out: Path) -> dict[str, dict[int, float]]:
    """Every logged value except timings (wall-clock figures differ between any two runs)."""
    return {
        k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items()
        if k not in TIMING and not k.startswith("peak_memory") and not k.endswith("_seconds")
        and k != "on_policy/generated_tokens_per_second"
    }


def assert_same_logs(a: dict, b: dict, *, rel: float = 1e-5, steps=None) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for step in steps or a[key]:
            assert b[key][step] == pytest.approx(a[key][step], rel=rel, abs=1e-6), (key, step)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, *, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        if atol:
            torch.testing.assert_close(sb[name], sa[name], rtol=1e-5, atol=atol, msg=name)
        else:
            assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("kind", sorted(KIND))
def test_fraction_zero_is_todays_recipe_step_for_step(assets_root, tmp_path, kind):
    base = [*KIND[kind], *COMMON]
    today = run_recipe(tiny_config(assets_root, tmp_path / "today", base), RECIPE)
    off = run_recipe(tiny_config(assets_root, tmp_path / "off", [*base, "on_policy.fraction=0",
                                                                  "on_policy.max_new_tokens=8"]), RECIPE)
    assert_same_logs(logged(tmp_path / "today"), logged(tmp_path / "off"), rel=0)
    assert_same_weights(today._model, off._model)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_on_policy_run_trains_kd_on_its_samples_and_logs_by_name(assets_root, tmp_path, kind):
    run_recipe(tiny_config(assets_root, tmp_path / "run", [
        *KIND[kind], *COMMON, "max_steps_per_epoch=6", "on_policy.fraction=0.5", "on_policy.max_new_tokens=10",
        "on_policy.temperature=0.9", "on_policy.top_p=0.95",
    ]), RECIPE)
    values = {k: dict(v) for k, v in run_logs.read_disk_log(tmp_path / "run" / "logs").items()}
    steps = set(range(1, 7))
    student = {s for s, v in values["on_policy/student_generated"].items() if v == 1.0}
    assert values["on_policy/student_generated"].keys() == steps and 0 < len(student) < 6
    # CE only where the labels are not the student's own samples; its NLL of them is logged instead.
    assert values["ce_loss"].keys() == steps - student
    assert values["on_policy/student_nll"].keys() == student
    for name in ("mean_generated_tokens", "eos_fraction", "generate_seconds", "score_seconds", "train_seconds",
                 "generated_tokens_per_second"):
        assert values[f"on_policy/{name}"].keys() == student, name
    for step in student:
        assert 1 <= values["on_policy/mean_generated_tokens"][step] <= 10
        assert 0 <= values["on_policy/eos_fraction"][step] <= 1
        assert values["on_policy/generate_seconds"][step] > 0 and values["kd_loss"][step] > 0
        assert values["weight/kd"][step] == 0.3 and "weight/ce" not in {k for k in values if step in values[k]}


@pytest.mark.parametrize("kind", sorted(KIND))
def test_accumulation_and_the_fused_pass_are_token_exact_on_generated_steps(assets_root, tmp_path, kind):
    """Greedy samples are the same however the rows are batched: then 4 x 1 unfused, 2 x 2 unfused and 2 x 2 fused
    are the same steps (every generated token weighted equally)."""
    base = [*KIND[kind], *COMMON, *GREEDY, "loss_scaling.method=dynamic"]
    one = run_recipe(tiny_config(assets_root, tmp_path / "one", [*base, "batch_size=4", "fused_output.enabled=false"]), RECIPE)
    acc = run_recipe(tiny_config(assets_root, tmp_path / "acc", [*base, "batch_size=2", "gradient_accumulation_steps=2",
                                                                  "fused_output.enabled=false"]), RECIPE)
    fused = run_recipe(tiny_config(assets_root, tmp_path / "fused", [*base, "batch_size=2", "gradient_accumulation_steps=2",
                                                                      "fused_output.enabled=true"]), RECIPE)
    reference = logged(tmp_path / "one")
    assert set(reference["on_policy/student_generated"].values()) == {1.0}
    assert_same_logs(reference, logged(tmp_path / "acc"), rel=1e-4)
    assert_same_logs(reference, logged(tmp_path / "fused"), rel=1e-4)
    assert_same_weights(one._model, acc._model, atol=1e-5)
    assert_same_weights(one._model, fused._model, atol=1e-5)


def run_as_of(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "logs")
    for state, path in checkpointing.list_training_states(dst):
        if state > step:
            shutil.rmtree(path.parent)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_mid_epoch_resume_samples_what_the_uninterrupted_run_sampled(assets_root, tmp_path, kind):
    common = [*KIND[kind], *COMMON, "max_steps_per_epoch=4", "batch_size=2", "gradient_accumulation_steps=2",
              "on_policy.fraction=0.6", "on_policy.max_new_tokens=8", "save_every_n_steps=2", "keep_last_n=10"]
    straight = run_recipe(tiny_config(assets_root, tmp_path / "straight", common), RECIPE)
    reference = logged(tmp_path / "straight")
    assert {v for v in reference["on_policy/student_generated"].values()} == {0.0, 1.0}
    run_as_of(tmp_path / "straight", tmp_path / "resumed", 2)
    resumed = run_recipe(tiny_config(assets_root, tmp_path / "resumed", [*common, "resume_from_checkpoint=true"]), RECIPE)
    values = logged(tmp_path / "resumed")
    for key, by_step in values.items():
        for step, value in by_step.items():
            assert step > 2 and value == pytest.approx(reference[key][step], rel=1e-6, abs=1e-7), (key, step)
    assert values["on_policy/student_generated"].keys() == {3, 4}
    assert_same_weights(straight._model, resumed._model)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_two_processes_equal_one_on_the_same_global_batch(assets_root, tmp_path, kind):
    """Greedy samples (the same whatever rank draws them), accumulation 2, fused pass: 2 ranks x 1 row x 2 micro-
    batches against 2 rows x 2 micro-batches on one device."""
    common = [*KIND[kind], *COMMON, *GREEDY, "gradient_accumulation_steps=2", "max_steps_per_epoch=2"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*common, "batch_size=2"]), RECIPE)
    run_distributed_config(tiny_config(assets_root, tmp_path / "dist", [*common, "batch_size=1"]), tmp_path / "dist.yaml")
    single, dist = logged(tmp_path / "single"), logged(tmp_path / "dist")
    assert set(single["on_policy/student_generated"].values()) == {1.0}
    assert_same_logs(single, dist, rel=1e-4)


def test_compiled_on_policy_steps_match_eager(assets_root, tmp_path, monkeypatch):
    """compile=True (the layers and the losses; aot_eager, as the other compile-wiring tests): sampling runs through
    the compiled layers with their KV caches, and the greedy samples and the steps are the eager ones."""
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    base = [*COMMON, *GREEDY, "max_steps_per_epoch=2", "on_policy.max_new_tokens=6"]
    eager = run_recipe(tiny_config(assets_root, tmp_path / "eager", base), RECIPE)
    compiled = run_recipe(tiny_config(assets_root, tmp_path / "compiled", [*base, "compile=True"]), RECIPE)
    assert compiled._compile and not eager._compile
    assert_same_logs(logged(tmp_path / "eager"), logged(tmp_path / "compiled"), rel=1e-4)
    assert_same_weights(eager._model, compiled._model, atol=1e-5)
