"""Loss weighting: torchtune's blend, manual scales, dynamic (EMA-normalised) scales."""

import math
import random

import pytest

from torchtune_kd.core.loss_weighting import LossWeighting


def test_blend_is_torchtunes_kd_ratio():
    weighting = LossWeighting.from_config({"enabled": False}, kd_ratio=0.25)
    assert weighting.method == "blend"
    assert weighting.weights({"ce": 3.0, "kd": 2.0}) == {"ce": 0.75, "kd": 0.25}
    # IR, when present, is logged but gets weight 0 in the blend.
    assert weighting.weights({"ce": 3.0, "kd": 2.0, "ir": 1.0})["ir"] == 0.0


def test_missing_block_means_blend():
    assert LossWeighting.from_config(None, kd_ratio=0.5).weights({"ce": 1.0, "kd": 1.0}) == {"ce": 0.5, "kd": 0.5}


def test_manual_scales_are_used_as_given():
    cfg = {"enabled": True, "method": "manual", "manual_scales": {"ce": 0.5, "kd": 0.3, "ir": 0.2}}
    weighting = LossWeighting.from_config(cfg, kd_ratio=0.9)
    assert weighting.weights({"ce": 10.0, "kd": 0.1, "ir": 0.5}) == {"ce": 0.5, "kd": 0.3, "ir": 0.2}
    weighting.update({"ce": 1.0, "kd": 1.0, "ir": 1.0})  # no state in manual mode
    assert weighting.weights({"ce": 10.0, "kd": 0.1, "ir": 0.5}) == {"ce": 0.5, "kd": 0.3, "ir": 0.2}


@pytest.mark.parametrize(
    "cfg, kd_ratio, match",
    [
        ({"enabled": True, "manual_scales": {"ce": -0.1, "kd": 1.0}}, 0.5, r"manual_scales\.ce"),
        ({"enabled": True, "manual_scales": {"ce": float("nan"), "kd": 1.0}}, 0.5, r"finite"),
        ({"enabled": True, "manual_scales": {"ce": float("inf")}}, 0.5, r"finite"),
        ({"enabled": True, "manual_scales": {"ce": "abc"}}, 0.5, r"must be a number"),
        ({"enabled": True, "manual_scales": {"ce": 0, "kd": 0, "ir": 0}}, 0.5, r"all 0"),
        ({"enabled": True, "manual_scales": {}}, 0.5, r"all 0"),
        ({"enabled": True, "manual_scales": {"ce": 1, "kld": 1}}, 0.5, r"unknown component.*kld"),
        ({"enabled": True, "method": "adaptive", "manual_scales": {"ce": 1}}, 0.5, r"method='adaptive'"),
        ({"enabled": True, "method": "dynamic", "manual_scales": {"ce": 1}, "dynamic": {"momentum": 1.0}}, 0.5, r"momentum"),
        ({"enabled": False}, 1.5, r"kd_ratio=1\.5"),
        ({"enabled": False}, -0.1, r"kd_ratio"),
    ],
)
def test_bad_scales_are_rejected(cfg, kd_ratio, match):
    with pytest.raises(ValueError, match=match):
        LossWeighting.from_config(cfg, kd_ratio=kd_ratio)


def test_dynamic_contributions_track_configured_shares_despite_100x_magnitudes():
    shares = {"ce": 0.5, "kd": 0.3, "ir": 0.2}
    weighting = LossWeighting.from_config(
        {"enabled": True, "method": "dynamic", "manual_scales": shares, "dynamic": {"momentum": 0.8}}, kd_ratio=0.5
    )
    rng = random.Random(0)
    # Raw magnitudes differ by 100x (CE ~ 5, KD ~ 0.05, IR ~ 0.5) and drift down as a real run does.
    base = {"ce": 5.0, "kd": 0.05, "ir": 0.5}
    observed = []
    for step in range(200):
        decay = math.exp(-step / 150)
        values = {c: base[c] * decay * (1 + 0.05 * rng.uniform(-1, 1)) for c in base}
        weights = weighting.weights(values)
        contributions = {c: weights[c] * values[c] for c in values}
        total = sum(contributions.values())
        observed.append({c: contributions[c] / total for c in contributions})
        weighting.update(values)
    for share in observed[20:]:
        for c, target in shares.items():
            assert share[c] == pytest.approx(target, abs=0.03), (c, share)
    # Manual scales on the same magnitudes would be dominated by CE.
    manual = {c: shares[c] * base[c] for c in base}
    assert manual["ce"] / sum(manual.values()) > 0.9


def test_dynamic_state_round_trips():
    cfg = {"enabled": True, "method": "dynamic", "manual_scales": {"ce": 1.0, "kd": 1.0}}
    first = LossWeighting.from_config(cfg, kd_ratio=0.5)
    first.weights({"ce": 2.0, "kd": 0.5})
    first.update({"ce": 1.0, "kd": 0.25})
    second = LossWeighting.from_config(cfg, kd_ratio=0.5)
    second.load_state_dict(first.state_dict())
    assert second.weights({"ce": 9.0, "kd": 9.0}) == first.weights({"ce": 9.0, "kd": 9.0})
    manual = LossWeighting.from_config({"enabled": True, "manual_scales": {"ce": 1.0}}, kd_ratio=0.5)
    with pytest.raises(ValueError, match="method"):
        manual.load_state_dict(first.state_dict())


def test_dynamic_first_step_uses_the_scales_and_reads_no_values():
    """No statistics yet: the scales as they are (independent of how the step is split); the step's means seed."""
    weighting = LossWeighting.from_config(
        {"enabled": True, "method": "dynamic", "manual_scales": {"ce": 0.5, "kd": 0.3, "ir": 0.2}}, kd_ratio=0.5
    )
    assert weighting.weights(["ce", "kd", "ir"]) == {"ce": 0.5, "kd": 0.3, "ir": 0.2}
    weighting.update({"ce": 4.0, "kd": 0.1, "ir": 0.5})
    assert weighting.weights(["ce", "kd", "ir"]) == pytest.approx({"ce": 0.125, "kd": 3.0, "ir": 0.4})
