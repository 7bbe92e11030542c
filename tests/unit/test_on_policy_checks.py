"""The pre-flight refuses what on-policy distillation cannot run with, before any weights load, naming key and fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchtune_kd.core import preflight
from torchtune_kd.testing.recipes import tiny_config

ON = ("on_policy.fraction=0.5", "on_policy.max_new_tokens=16")


def problems(assets_root: Path, tmp_path: Path, *overrides: str, build_data: bool = False) -> str:
    cfg = tiny_config(assets_root, tmp_path / "out", overrides)
    with pytest.raises(preflight.ConfigError) as info:
        preflight.validate_config(cfg, check_device=False, build_data=build_data)
    return str(info.value)


def test_every_bad_setting_is_reported_together(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, "on_policy.fraction=2", "on_policy.top_p=0", "on_policy.temperature=-1",
                       "on_policy.max_new_tokens=0", "on_policy.typo=1")
    for key in ("fraction=2", "top_p=0", "temperature=-1", "max_new_tokens=0", "on_policy.typo is not a key"):
        assert f"on_policy.{key}" in message or key in message, (key, message)


def test_a_teacher_cache_is_refused(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, *ON, f"teacher_cache.path={tmp_path / 'cache'}")
    assert re.search(r"on_policy \(fraction=0\.5.*with teacher_cache: .*Remove teacher_cache", message), message


def test_samples_that_cannot_fit_in_max_seq_len_are_refused(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, "on_policy.fraction=1", "on_policy.max_new_tokens=250",
                       "on_policy.prompt_tokens=8", "tokenizer.max_seq_len=256")
    assert re.search(r"on_policy\.max_new_tokens=250 with on_policy\.prompt_tokens=8 exceeds tokenizer\.max_seq_len=256"
                     r".*at most 256", message), message
    message = problems(assets_root, tmp_path, "on_policy.teacher_generated=true", "on_policy.max_new_tokens=256")
    assert "on_policy.max_new_tokens=256 with a prompt of 1 token exceeds tokenizer.max_seq_len=256" in message


def test_packed_data_is_refused(assets_root, tmp_path):
    message = problems(assets_root, tmp_path, *ON, "dataset.packed=True")
    assert "dataset.packed=True with on_policy" in message and "Set dataset.packed=False" in message


def test_a_dataset_without_a_prompt_part_needs_a_prefix_length(assets_root, tmp_path):
    # alpaca's default train_on_input=True: every token is a label.
    message = problems(assets_root, tmp_path, *ON, build_data=True)
    assert re.search(r"on_policy\.prompt_tokens=None .* every token is a label .* on_policy\.prompt_tokens=32", message)
    for fix in (["dataset.train_on_input=False"], ["on_policy.prompt_tokens=8"]):
        cfg = tiny_config(assets_root, tmp_path / "ok", [*ON, *fix])
        assert preflight.validate_config(cfg, check_device=False, build_data=True) is not None


def test_off_means_nothing_is_checked_beyond_the_section(assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "out", ["on_policy.fraction=0", "on_policy.max_new_tokens=1000",
                                                      "dataset.packed=True"])
    assert preflight.validate_config(cfg, check_device=False, build_data=True) is not None
