"""A teacher padded past the student's vocabulary (same tokenizer) through the whole recipe, on every path.

The stand-in teacher with 64 padding rows appended (``models.padding``, random rows as large as the trained ones, so
that the teacher puts real probability on them) must train the student exactly as the unpadded teacher does: KD
compares the renormalised distribution over the shared rows, which only those rows' logits decide. Checked for the
unfused (chunked) and fused passes with LoRA and full students, from a teacher cache and on two gloo processes; the
dropped mass is logged and equals the one computed here from the teacher's logits; another tokenizer is refused
before any weight loads.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_kd.core import vocabularies
from torchtune_kd.errors import ConfigError
from torchtune_kd.evaluation import run_logs
from torchtune_kd.models.padding import pad_vocabulary
from torchtune_kd.testing import standin_text
from torchtune_kd.testing.recipes import (
    LORA_OVERRIDES, assert_logged_values_equal, assert_same_weights, load_recipe_module, refusal_before_weights,
    run_distributed_config, run_recipe, tiny_config,
)

RECIPE = load_recipe_module()
VOCAB, PAD_ROWS = 1280, 64
KIND = {"full": [], "lora": list(LORA_OVERRIDES)}
COMMON = ["max_steps_per_epoch=2", "log_every_n_steps=1", "gradient_accumulation_steps=2", "seed=3"]
TIMING = {"tokens_per_second", "tokens_per_second_per_gpu", "peak_memory_rss_gib"}
MASS = f"kd/{vocabularies.PADDING_MASS}"


def tokenizer_overrides(folder: Path, key: str = "teacher_tokenizer") -> list[str]:
    return [f"{key}._component_=torchtune.models.llama3.llama3_tokenizer", f"{key}.path={folder}/tokenizer.model",
            f"{key}.special_tokens_path={folder}/tokenizer.json"]


@pytest.fixture(scope="module")
def padded_teacher(tiny_assets, assets_root, tmp_path_factory) -> Path:
    """The stand-in teacher plus 64 rows (its tokenizer files copied along: another path, the same tokenizer)."""
    return pad_vocabulary(assets_root / "teacher", tmp_path_factory.mktemp("padded") / "teacher", PAD_ROWS, seed=1)


def padded(folder: Path) -> list[str]:
    return [f"teacher_model.vocab_size={VOCAB + PAD_ROWS}", f"teacher_checkpointer.checkpoint_dir={folder}",
            *tokenizer_overrides(folder)]


def logged(out: Path) -> dict:
    return {k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items() if k not in TIMING}


def assert_same_run(plain: dict, padded_run: dict) -> None:
    assert set(padded_run) - set(plain) == {MASS}, set(padded_run) ^ set(plain)
    assert_logged_values_equal(plain, padded_run, rel=1e-5)


# Full on the unfused (chunked) pass, LoRA on the fused one: each kind of student, each pass.
@pytest.mark.parametrize("kind,path", [("full", "unfused"), ("lora", "fused")])
def test_a_padded_teacher_trains_the_student_as_the_unpadded_one(assets_root, padded_teacher, tmp_path, kind, path):
    extra = [*KIND[kind], *COMMON, f"fused_output.enabled={'true' if path == 'fused' else 'false'}"]
    plain = run_recipe(tiny_config(assets_root, tmp_path / "plain", extra), RECIPE)
    run = run_recipe(tiny_config(assets_root, tmp_path / "padded", [*extra, *padded(padded_teacher)]), RECIPE)
    assert run._facts.shared_vocab == VOCAB and run._output_pass.fused == (path == "fused")
    a, b = logged(tmp_path / "plain"), logged(tmp_path / "padded")
    assert_same_run(a, b)
    assert b[MASS].keys() == {1, 2} and all(0.0 < v < 1.0 for v in b[MASS].values())
    assert_same_weights(plain._model, run._model)


def test_the_logged_padding_mass_is_the_teachers_probability_on_its_padding_rows(assets_root, padded_teacher, tmp_path):
    """Step 1's logged mean, recomputed here from the padded teacher's full logits on the step's batches."""
    cfg = tiny_config(assets_root, tmp_path / "run", [*COMMON, "max_steps_per_epoch=1", "fused_output.enabled=false",
                                                      *padded(padded_teacher)])
    recipe = RECIPE.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    batches = next(iter(recipe._micro_batches()))
    total, counted = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = recipe._teacher_model(batch["tokens"])
            logits = torch.cat(logits, dim=1) if isinstance(logits, list) else logits  # chunked output
            probs = torch.softmax(logits.double(), dim=-1)
            labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
            mask = labels != -100
            total += float(probs[..., VOCAB:].sum(-1)[mask].sum())
            counted += int(mask.sum())
    recipe.train()
    recipe.cleanup()
    assert logged(tmp_path / "run")[MASS][1] == pytest.approx(total / counted, rel=1e-4)


def test_a_cache_of_the_padded_teacher_trains_as_the_live_unpadded_teacher(assets_root, padded_teacher, tmp_path):
    """k = the shared vocabulary in fp32: the cache stores the renormalised shared rows, exactly."""
    no_ir = ["layer_mapping=null", "loss_scaling.manual_scales.ir=0", "model.output_hidden_states=false",
             "teacher_model.output_hidden_states=false", "fused_output.enabled=false"]
    prepass = importlib.import_module("recipes.cache_teacher")
    cache = tmp_path / "cache"
    cfg = tiny_config(assets_root, tmp_path / "unused", [
        *COMMON, *no_ir, *padded(padded_teacher), f"teacher_cache.path={cache}", f"teacher_cache.top_k={VOCAB}",
        "teacher_cache.dtype=float32", "dataset.split=train[:32]",
    ])
    writer = prepass.TeacherCachePrepass(cfg)
    writer.run()
    writer.cleanup()
    manifest = OmegaConf.load(cache / "manifest.json")
    assert 0.0 < manifest.teacher_padding_mass < 1.0
    live = run_recipe(tiny_config(assets_root, tmp_path / "live", [*COMMON, *no_ir, "dataset.split=train[:32]"]), RECIPE)
    cached = run_recipe(tiny_config(assets_root, tmp_path / "cached", [
        *COMMON, *no_ir, *padded(padded_teacher), "dataset.split=train[:32]", f"teacher_cache.path={cache}",
    ]), RECIPE)
    assert cached._teacher_model is None
    a, b = logged(tmp_path / "live"), logged(tmp_path / "cached")
    assert a.keys() == b.keys()
    assert_logged_values_equal(a, b, rel=1e-5)
    assert_same_weights(live._model, cached._model)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_two_processes_equal_one_with_a_padded_teacher(assets_root, padded_teacher, tmp_path, kind):
    common = [*KIND[kind], *COMMON, *padded(padded_teacher), "max_steps_per_epoch=1"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*common, "batch_size=4"]), RECIPE)
    run_distributed_config(tiny_config(assets_root, tmp_path / "dist", [*common, "batch_size=2"]), tmp_path / "dist.yaml")
    single, dist = logged(tmp_path / "single"), logged(tmp_path / "dist")
    assert MASS in single
    assert_logged_values_equal(single, dist, rel=1e-4)


def test_another_tokenizer_is_refused_before_any_weight_loads(assets_root, padded_teacher, tmp_path, monkeypatch):
    other = tmp_path / "other_tokenizer"
    standin_text.build_tokenizer(other, bpe_vocab_size=900)
    cfg = tiny_config(assets_root, tmp_path / "run", [*COMMON, *padded(padded_teacher)[:2], *tokenizer_overrides(other)])
    assert "teacher_tokenizer is another tokenizer than tokenizer" in refusal_before_weights(cfg, monkeypatch, RECIPE)


def test_sizes_alone_are_refused_with_the_fix(assets_root, padded_teacher, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "run", [*COMMON, *padded(padded_teacher)[:2]])
    with pytest.raises(ConfigError, match="add teacher_tokenizer"):
        RECIPE.KDRecipeSingleDevice(cfg=cfg)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
