"""How the CE, KD and IR components are combined into the optimised objective.

Three modes, chosen by the ``loss_scaling`` config block:

- ``enabled: false`` (torchtune's blend): ``(1 - kd_ratio) * CE + kd_ratio * KD``. An IR loss, if configured, is
  still computed and logged but gets weight 0 (the caller is told so once, at set-up).
- ``method: manual``: ``ce * w_ce + kd * w_kd + ir * w_ir`` with the given ``manual_scales``.
- ``method: dynamic``: each component is divided by a running (exponential moving average) estimate of its own
  magnitude, then weighted by the scales. KL, JSD, TVD and cosine IR live on very different scales; dividing by the
  running magnitude makes each component's contribution ``w_c * L_c / EMA(L_c) ~= w_c``, so the configured shares
  hold. Weights stay fixed within an optimiser step (computed before it, from earlier steps) so that gradient
  accumulation optimises one well-defined objective. The first step has no statistics yet: it uses the scales as
  they are, and its exact step means seed the averages. So the weights never depend on how a step is split into
  micro-batches or across ranks, and computing them needs no value from the device.

The weights are plain floats (no autograd through them).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

COMPONENTS = ("ce", "kd", "ir")


def _finite_non_negative(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number >= 0") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}={value!r} must be finite and >= 0")
    return number


class LossWeighting:
    """Combine loss components with fixed, blended or dynamically normalised weights.

    Args:
        method (str): ``"blend"`` (torchtune's ``kd_ratio``), ``"manual"`` or ``"dynamic"``.
        scales (Mapping[str, float]): weights for ``ce``, ``kd``, ``ir`` (missing ones are 0).
        momentum (float): EMA momentum for ``dynamic`` (weight of the old estimate). Default 0.9.
        eps (float): floor for the running magnitude in ``dynamic``. Default 1e-8.

    Raises:
        ValueError: unknown method or component, a scale that is negative or not finite, all scales 0, or a
            momentum outside [0, 1).
    """

    def __init__(
        self,
        method: str,
        scales: Mapping[str, float],
        *,
        momentum: float = 0.9,
        eps: float = 1e-8,
    ) -> None:
        if method not in ("blend", "manual", "dynamic"):
            raise ValueError(f"loss_scaling.method={method!r} is not supported: use 'manual' or 'dynamic'")
        unknown = sorted(set(scales) - set(COMPONENTS))
        if unknown:
            raise ValueError(
                f"loss_scaling.manual_scales has unknown component(s) {unknown}: the components are {list(COMPONENTS)}"
            )
        self.method = method
        self.scales = {c: _finite_non_negative(f"loss_scaling.manual_scales.{c}", scales.get(c, 0.0)) for c in COMPONENTS}
        if not any(self.scales.values()):
            raise ValueError(
                f"loss_scaling.manual_scales={dict(scales)} are all 0: nothing would be optimised; give at least one "
                "component a positive scale"
            )
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"loss_scaling.dynamic.momentum={momentum} must be in [0, 1)")
        self.momentum = momentum
        self.eps = float(eps)
        self.running: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, kd_ratio: float) -> "LossWeighting":
        """Build from a ``loss_scaling`` config block and the top-level ``kd_ratio``.

        ``cfg`` may be ``None`` or have ``enabled: false``; then torchtune's blend with ``kd_ratio`` is used.
        """
        cfg = dict(cfg or {})
        if not cfg.get("enabled", False):
            ratio = float(kd_ratio)
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"kd_ratio={kd_ratio!r} must be in [0, 1]: (1 - kd_ratio) * CE + kd_ratio * KD")
            return cls("blend", {"ce": 1.0 - ratio, "kd": ratio, "ir": 0.0})
        method = cfg.get("method", "manual")
        scales = cfg.get("manual_scales") or {}
        dynamic = dict(cfg.get("dynamic") or {})
        return cls(method, dict(scales), momentum=dynamic.get("momentum", 0.9), eps=dynamic.get("eps", 1e-8))

    @classmethod
    def from_recipe_config(cls, cfg: Mapping[str, Any]) -> "LossWeighting":
        """Build from a whole recipe config (its ``loss_scaling`` block and ``kd_ratio``)."""
        from omegaconf import DictConfig, OmegaConf

        scaling = cfg.get("loss_scaling", None)
        block = OmegaConf.to_container(scaling, resolve=True) if isinstance(scaling, DictConfig) else scaling
        return cls.from_config(block, cfg.get("kd_ratio", 0.5))

    def weights(self, components: Iterable[str]) -> dict[str, float]:
        """Effective weights for the next optimiser step.

        Args:
            components (Iterable[str]): the components present this step (values are not read).

        Returns:
            dict[str, float]: weight per present component; in ``dynamic`` mode a component without statistics yet
            (the first step) gets its scale as it is.
        """
        present = [c for c in COMPONENTS if c in components]
        if self.method != "dynamic":
            return {c: self.scales[c] for c in present}
        return {
            c: self.scales[c] / max(self.running[c], self.eps) if c in self.running else self.scales[c] for c in present
        }

    def update(self, step_values: Mapping[str, float]) -> None:
        """Fold one optimiser step's component means into the running magnitudes (``dynamic`` only)."""
        if self.method != "dynamic":
            return
        for c, value in step_values.items():
            magnitude = abs(float(value))
            if not math.isfinite(magnitude):
                continue
            old = self.running.get(c)
            self.running[c] = magnitude if old is None else self.momentum * old + (1 - self.momentum) * magnitude

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scales": dict(self.scales), "running": dict(self.running)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.method:
            raise ValueError(
                f"checkpointed loss_scaling method {state.get('method')!r} differs from the config's {self.method!r}"
            )
        self.running = {k: float(v) for k, v in dict(state.get("running", {})).items()}
