"""A teacher with another tokenizer (``cross_tokenizer``) through the whole recipe on the tiny stand-ins.

- the same tokenizer twice, ULD off: the cross-tokenizer path is today's recipe (the alignment is the identity and
  every token is shared), LoRA and full students;
- a teacher tokenizer with other merges: KD at the aligned positions, logged by name; accumulation and two gloo
  processes give the single-batch, single-process run (LoRA and full);
- what is refused (IR, a teacher cache, the fused pass asked for) is refused before any weight loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torchtune_kd.errors import ConfigError
from torchtune_kd.evaluation import run_logs
from torchtune_kd.testing import standin_text
from torchtune_kd.testing.recipes import (
    LORA_OVERRIDES, assert_logged_values_equal, assert_same_weights, load_recipe_module, refusal_before_weights,
    run_distributed_config, run_recipe, tiny_config,
)

RECIPE = load_recipe_module()
KIND = {"full": [], "lora": list(LORA_OVERRIDES)}
TIMING = {"tokens_per_second", "tokens_per_second_per_gpu", "peak_memory_rss_gib"}
NO_IR = ["layer_mapping=null", "loss_scaling.manual_scales.ir=0", "model.output_hidden_states=false",
         "teacher_model.output_hidden_states=false", "fused_output.enabled=false"]
COMMON = [*NO_IR, "max_steps_per_epoch=2", "log_every_n_steps=1", "gradient_accumulation_steps=2", "seed=4"]


def teacher_tokenizer(folder: Path) -> list[str]:
    return ["teacher_tokenizer._component_=torchtune.models.llama3.llama3_tokenizer",
            f"teacher_tokenizer.path={folder}/tokenizer.model",
            f"teacher_tokenizer.special_tokens_path={folder}/tokenizer.json"]


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE with 900 merges where the student's has 1024: the same text in more, shorter tokens."""
    folder = tmp_path_factory.mktemp("other_tokenizer")
    standin_text.build_tokenizer(folder, bpe_vocab_size=900)
    return folder


def logged(out: Path) -> dict:
    return {k: dict(v) for k, v in run_logs.read_disk_log(out / "logs").items() if k not in TIMING}


@pytest.mark.parametrize("kind", sorted(KIND))
def test_the_same_tokenizer_twice_is_todays_recipe(assets_root, tmp_path, kind):
    plain = run_recipe(tiny_config(assets_root, tmp_path / "plain", [*KIND[kind], *COMMON]), RECIPE)
    cross = run_recipe(tiny_config(assets_root, tmp_path / "cross", [
        *KIND[kind], *COMMON, *teacher_tokenizer(assets_root / "tokenizer"), "cross_tokenizer.uld_weight=0",
    ]), RECIPE)
    a, b = logged(tmp_path / "plain"), logged(tmp_path / "cross")
    assert set(b) - set(a) == {"kd/aligned_fraction"} and set(a) <= set(b)
    assert all(v == 1.0 for v in b["kd/aligned_fraction"].values())
    assert_logged_values_equal(a, b, rel=1e-5)
    assert_same_weights(plain._model, cross._model)


@pytest.mark.parametrize("kind", sorted(KIND))
def test_another_tokenizer_trains_kd_at_aligned_positions_weighing_every_student_token_equally(
    assets_root, other_tokenizer, tmp_path, kind
):
    """KD at the aligned positions, logged by name; 4 rows x 1 micro-batch = 2 rows x 2 micro-batches: the aligned
    positions' KD is normalised by the step's counted student tokens, whatever the split."""
    common = [*KIND[kind], *COMMON, *teacher_tokenizer(other_tokenizer), "cross_tokenizer.uld_top_k=32",
              "cross_tokenizer.uld_weight=0.5"]
    whole = run_recipe(tiny_config(assets_root, tmp_path / "whole", [*common, "batch_size=4",
                                                                     "gradient_accumulation_steps=1"]), RECIPE)
    split = run_recipe(tiny_config(assets_root, tmp_path / "split", [*common, "batch_size=2",
                                                                     "gradient_accumulation_steps=2"]), RECIPE)
    values = logged(tmp_path / "whole")
    assert values["kd_loss"].keys() == {1, 2} and all(v > 0 for v in values["kd_loss"].values())
    assert all(0.0 < v <= 1.0 for v in values["kd/aligned_fraction"].values())
    assert_logged_values_equal(values, logged(tmp_path / "split"), rel=1e-5)
    assert_same_weights(whole._model, split._model)
    # The teacher read its own tokens: more of them than the student's for the same text (900 merges < 1024).
    batch = next(iter(whole._micro_batches()))[0]
    assert (batch["teacher_tokens"] != 0).sum() > batch["real_tokens"].sum()


@pytest.mark.parametrize("kind", sorted(KIND))
def test_two_processes_equal_one_with_another_tokenizer(assets_root, other_tokenizer, tmp_path, kind):
    common = [*KIND[kind], *COMMON, *teacher_tokenizer(other_tokenizer), "cross_tokenizer.uld_top_k=32",
              "cross_tokenizer.uld_weight=0.5", "max_steps_per_epoch=1"]
    run_recipe(tiny_config(assets_root, tmp_path / "single", [*common, "batch_size=4"]), RECIPE)
    run_distributed_config(tiny_config(assets_root, tmp_path / "dist", [*common, "batch_size=2"]), tmp_path / "dist.yaml")
    single, dist = logged(tmp_path / "single"), logged(tmp_path / "dist")
    assert "kd/aligned_fraction" in single
    assert_logged_values_equal(single, dist, rel=1e-4)


@pytest.mark.parametrize("extra,message", [
    (["layer_mapping=[[0,1],[1,3]]", "model.output_hidden_states=true", "teacher_model.output_hidden_states=true",
      "loss_scaling.manual_scales.ir=0.2"], "IR across tokenizers is not supported"),
    (["teacher_cache.path=/nonexistent/cache"], "a foreign-tokenizer teacher is run live"),
    (["fused_output.enabled=true"], "fused_output.enabled=true, but cross_tokenizer is set"),
    (["cross_tokenizer.uld_weight=0", "cross_tokenizer.exact_weight=0"], "both 0"),
    (["cross_tokenizer.uld_top_k=0"], "cross_tokenizer.uld_top_k=0 must be an integer >= 1"),
    (["cross_tokenizer.uld_wieght=1"], "did you mean 'cross_tokenizer.uld_weight'"),
])
def test_what_is_not_supported_is_refused_before_any_weight_loads(assets_root, other_tokenizer, tmp_path, monkeypatch,
                                                                   extra, message):
    cfg = tiny_config(assets_root, tmp_path / "run", [*COMMON, *teacher_tokenizer(other_tokenizer),
                                                      "cross_tokenizer.uld_top_k=32", *extra])
    assert message in refusal_before_weights(cfg, monkeypatch, RECIPE)


def test_cross_tokenizer_without_teacher_tokenizer_is_refused(assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "run", [*COMMON, "cross_tokenizer.uld_top_k=32"])
    with pytest.raises(ConfigError, match="needs teacher_tokenizer"):
        RECIPE.KDRecipeSingleDevice(cfg=cfg)
