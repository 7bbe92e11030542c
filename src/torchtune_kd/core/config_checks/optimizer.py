"""``optimizer``, ``lr_scheduler`` and ``profiler``: the classes import and take the keys the config gives them.

Nothing is built: the optimiser needs the model's parameters, which do not exist before the weights load, so its
class is imported and its keywords are checked against its signature. ``lr_scheduler`` is optional: a null
``_component_`` switches it off (``top_level.disable_null_components``) and torchtune's builder checks the rest.
"""

from __future__ import annotations

from omegaconf import DictConfig

from torchtune_kd.core.config_checks.common import Findings, as_number, show
from torchtune_kd.core.config_checks.components import check_kwargs, resolve_component

# The recipe runs this one and reads its (profiler, config) return value; other profilers return something else.
PROFILER_COMPONENT = "torchtune.training.setup_torch_profiler"


def check_optimizer(cfg: DictConfig) -> Findings:
    """The optimiser class imports, its keywords exist and ``lr`` is a number >= 0 (no parameters needed)."""
    found = Findings()
    section = cfg.get("optimizer", None)
    if section is None:
        return found  # reported as a missing required key
    target = resolve_component("optimizer", section, found.problems, example="torch.optim.AdamW")
    if not isinstance(section, DictConfig):
        return found
    if "lr" in section:
        lr = section.get("lr")
        # Strictly a number: torch compares it with floats, so even the string "3e-4" fails there.
        number = as_number(lr, strings=False)
        if number is None or number < 0:
            found.problems.append(f"optimizer.lr={show(lr)} must be a number >= 0: e.g. optimizer.lr=3e-4")
    if target is not None:
        check_kwargs("optimizer", section, target, found.problems)
    return found


def check_profiler(cfg: DictConfig) -> Findings:
    """The recipe unpacks ``setup_torch_profiler``'s (profiler, config) result: no other component fits."""
    found = Findings()
    section = cfg.get("profiler", None)
    if section is None:
        return found
    if not isinstance(section, DictConfig):
        found.problems.append(
            f"profiler={show(section)} must be a mapping, e.g. profiler: {{_component_: {PROFILER_COMPONENT}, "
            "enabled: false}, or null"
        )
        return found
    name = section.get("_component_", None)
    if name is not None and name != PROFILER_COMPONENT:
        found.problems.append(
            f"profiler._component_={name!r} is not supported: set profiler._component_={PROFILER_COMPONENT} (the only "
            "profiler the recipe runs) or remove the profiler section"
        )
    return found
