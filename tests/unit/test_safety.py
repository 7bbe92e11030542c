"""Stopping safely: the non-finite step guard's budget and message, signal-to-flag handling, the exit-status line."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path

import pytest

from torchtune_kd.core import safety
from torchtune_kd.errors import TrainingDivergedError

FINITE = {"loss": 1.5, "ce": 1.0, "kd": 0.5, "ir": 0.0, "grad_norm": 2.0}


def test_a_finite_step_is_applied_and_costs_nothing_from_the_budget():
    guard = safety.NonFiniteGuard(max_skips=0)
    assert guard.check(FINITE, step=1, epoch=0, last_checkpoint=None) is True
    assert guard.skipped == 0


def test_values_the_guard_does_not_check_never_stop_a_step():
    guard = safety.NonFiniteGuard(max_skips=0)
    # Only the loss components and the gradient norm decide whether the update is applied.
    assert guard.check({**FINITE, "kd/agreement": math.nan, "lr": math.inf}, step=1, epoch=0, last_checkpoint=None)


@pytest.mark.parametrize("component", safety.CHECKED)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_component_within_the_budget_skips_the_step(component, value, caplog):
    guard = safety.NonFiniteGuard(max_skips=2)
    with caplog.at_level(logging.WARNING):
        assert guard.check({**FINITE, component: value}, step=7, epoch=1, last_checkpoint=None) is False
    assert guard.skipped == 1
    assert f"Skipping step 7 (epoch 2): {component}={value}" in caplog.text
    assert "non-finite step 1 of max_nonfinite_steps=2" in caplog.text


def test_beyond_the_budget_the_run_stops_naming_step_components_and_last_checkpoint(tmp_path):
    guard = safety.NonFiniteGuard(max_skips=1)
    assert guard.check({**FINITE, "kd": math.nan}, step=3, epoch=0, last_checkpoint=None) is False
    with pytest.raises(TrainingDivergedError) as info:
        guard.check({**FINITE, "loss": math.inf, "grad_norm": math.nan}, step=4, epoch=0,
                    last_checkpoint=tmp_path / "step_2")
    message = str(info.value)
    assert "training diverged at step 4 (epoch 1): loss=inf, grad_norm=nan" in message
    assert f"Last good checkpoint: {tmp_path / 'step_2'}" in message
    assert "max_nonfinite_steps=N skips up to N such steps (now 1)" in message


def test_with_no_budget_the_first_non_finite_step_stops_and_says_nothing_was_saved():
    guard = safety.NonFiniteGuard(max_skips=0)
    with pytest.raises(TrainingDivergedError, match=r"Last good checkpoint: none \(nothing was saved"):
        guard.check({**FINITE, "ce": math.nan}, step=1, epoch=0, last_checkpoint=None)


def test_skips_restored_on_resume_count_against_the_budget():
    guard = safety.NonFiniteGuard(max_skips=2, skipped=2)
    with pytest.raises(TrainingDivergedError):
        guard.check({**FINITE, "ir": math.nan}, step=10, epoch=0, last_checkpoint=Path("ckpt"))


def test_a_signal_sets_the_flag_instead_of_stopping_the_process_and_handlers_come_back(caplog):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with caplog.at_level(logging.WARNING), safety.StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert "Received SIGTERM: finishing the current optimiser step" in caplog.text
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_second_ctrl_c_aborts_at_once():
    with safety.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_sigterm_after_a_sigint_is_recorded_not_an_abort():
    with safety.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM


def test_the_report_names_the_signal_the_step_the_checkpoint_and_how_to_resume(tmp_path, caplog):
    stop = safety.StopSignals()
    stop.received = signal.SIGINT
    with caplog.at_level(logging.WARNING):
        stop.report(12, tmp_path / "state", note="Exiting with status 130 (128 + SIGINT).")
        stop.report(12, tmp_path / "state", signum=signal.SIGTERM)  # received by another rank
    assert f"Stopped by SIGINT after step 12: resumable checkpoint in {tmp_path / 'state'}" in caplog.text
    assert "resume_from_checkpoint=True. Exiting with status 130" in caplog.text
    assert "Stopped by SIGTERM after step 12" in caplog.text


def test_the_exit_note_gives_128_plus_the_signal_and_what_torchrun_makes_of_it():
    assert safety.exit_note(signal.SIGTERM) == "Exiting with status 143 (128 + SIGTERM)."
    assert safety.exit_note(signal.SIGINT) == "Exiting with status 130 (128 + SIGINT)."
    launched = safety.exit_note(signal.SIGTERM, launcher=True)
    assert launched.startswith("Each rank exits with status 143 (128 + SIGTERM)")
    assert "exit status 1" in launched and "this checkpoint is complete" in launched
