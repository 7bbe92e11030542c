"""scripts/demo.py's (torchtune_kd.cli.demo) arguments: every bad value is refused with its option named before anything is built or any
folder is touched; nothing is silently replaced by a default or read as another option."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torchtune_kd.cli import demo as demo_command


@pytest.fixture()
def demo(monkeypatch):
    """The demo's command module, with every stage-1 set-up failing the test if reached."""
    module = demo_command

    def heavy(*args, **kwargs):
        raise AssertionError("stage 1 started before the refusal")

    monkeypatch.setattr(module, "prepare_tiny", heavy)
    monkeypatch.setattr(module, "prepare_real", heavy)
    return module


def refusal(demo, tmp_path: Path, *argv: str) -> str:
    """The message a run with ``argv`` ends with; no folder may have been created."""
    with pytest.raises(SystemExit) as err:
        demo.main([*argv, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert list(tmp_path.iterdir()) == []
    return str(err.value.code)


def test_student_layers_zero_is_refused_not_replaced_by_the_default(demo, tmp_path):
    assert refusal(demo, tmp_path, "--tiny", "--student-layers", "0") == (
        "error: --student-layers=0 must be from 1 to 3: the student is the tiny stand-in teacher (4 layers) with at "
        "least one layer pruned")


@pytest.mark.parametrize("tiny, layers, depth", [(True, "4", 4), (True, "99", 4), (False, "30", 30), (False, "99", 30)])
def test_student_layers_must_leave_the_teacher_shallower(demo, tmp_path, tiny, layers, depth):
    message = refusal(demo, tmp_path, *(["--tiny"] if tiny else []), "--student-layers", layers)
    assert message.startswith(f"error: --student-layers={layers} must be from 1 to {depth - 1}")


def test_student_layers_within_the_teacher_are_accepted(demo):
    assert demo.parse_args(["--student-layers", "29"]).student_layers == 29
    assert demo.parse_args(["--tiny", "--student-layers", "1"]).student_layers == 1


@pytest.mark.parametrize("option, value, expected", [
    ("--exports", "0", "error: --exports=0 must be at least 1"),
    ("--steps-per-export", "0", "error: --steps-per-export=0 must be at least 1"),
    ("--steps-per-export", "-2", "error: --steps-per-export=-2 must be at least 1"),
    ("--lm-eval-limit", "0", "error: --lm-eval-limit=0 must be at least 1 (documents per lm-eval task)"),
    ("--teacher-pretrain-steps", "-1", "error: --teacher-pretrain-steps=-1 must be at least 0"),
])
def test_counts_out_of_range_are_refused_naming_the_option(demo, tmp_path, option, value, expected):
    assert refusal(demo, tmp_path, "--tiny", option, value) == expected


def test_an_abbreviated_option_is_an_error_not_another_option(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--tiny", "--steps", "0", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert err.value.code == 2 and "unrecognized arguments: --steps" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_cache_entry_lists_match_what_the_tiny_set_up_writes(demo, tiny_assets):
    # tiny_assets is standins.build_all's output: exactly what the demo's --tiny set-up writes in its cache.
    from torchtune_kd.output_folder import MARKER

    assert set(os.listdir(tiny_assets["root"])) - {MARKER} == set(demo.TINY_CACHE_ENTRIES)


def test_the_real_model_depth_is_the_converted_teachers(demo):
    from torchtune_kd.models import smollm2

    assert demo.teacher_depth(False) == smollm2._hf_config(smollm2.SMOLLM2_135M_ARGS["num_layers"])[
        "num_hidden_layers"] == 30
