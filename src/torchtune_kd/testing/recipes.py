"""Running the distillation recipe in-process on the tiny stand-ins: configs built the way ``tune run`` builds them.

For the tests and the benchmarks of a checkout (the recipes are not part of the installed package): the recipe is
imported as ``recipes.knowledge_distillation_single_device``, which the install hook
(:mod:`torchtune_kd.recipes_path`) resolves to the checkout's own ``recipes`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from torchtune_kd.cli import checkout_dir

REPO = checkout_dir()
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"

# A LoRA student (rank 8 on the attention projections and the MLP) as command-line overrides.
LORA_OVERRIDES = (
    "model._component_=torchtune.models.llama3.lora_llama3",
    "model.lora_attn_modules=[q_proj,v_proj,output_proj]",
    "model.apply_lora_to_mlp=true",
    "model.apply_lora_to_output=false",
    "model.lora_rank=8",
    "model.lora_alpha=16",
    "model.lora_dropout=0.0",
)


def load_recipe_module() -> ModuleType:
    """The single-device recipe's module (``KDRecipeSingleDevice``, ``recipe_main``)."""
    import recipes.knowledge_distillation_single_device as module

    return module


def tiny_config(
    assets: Path, output_dir: Path, overrides: Iterable[str] = (), *, config: Path = TINY_CONFIG
) -> DictConfig:
    """A config (default configs/tiny_cpu.yaml) with the stand-ins' folder and the output folder filled in, plus
    command-line overrides merged by torchtune's own command-line code.

    So every tested config is one a user can reproduce with ``tune run ... --config <yaml> <overrides>``: on a
    section with a ``_component_``, ``key=X`` sets ``key._component_`` (``key=None`` switches an optional section
    off), ``~key.sub`` removes a key, and removing a whole component is refused as ``tune run`` refuses it.

    Side effect: sets ``KD_ASSETS`` to ``assets`` in this process's environment (the config reads it).
    """
    from argparse import Namespace

    from torchtune.config._utils import _merge_yaml_and_cli_args

    os.environ["KD_ASSETS"] = str(assets)
    yaml = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    cfg = _merge_yaml_and_cli_args(Namespace(**yaml), [f"output_dir={output_dir}", *overrides])
    # Resolved now: the variables it reads (KD_ASSETS) differ between callers.
    OmegaConf.resolve(cfg)
    return cfg


def run_recipe(cfg: DictConfig, module: Optional[ModuleType] = None) -> Any:
    """Set up, train and clean up ``KDRecipeSingleDevice`` (of ``module``, default the checkout's recipe) on ``cfg``;
    returns the finished recipe object."""
    module = module or load_recipe_module()
    recipe = module.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


def run_distributed_config(cfg: DictConfig, config_file: Path, *, nproc: int = 2, timeout: float = 300) -> None:
    """Write ``cfg`` to ``config_file``, create its output folder and run the distributed recipe on it with ``nproc``
    gloo processes (``testing.launch``); a failed run raises with the end of its output."""
    from torchtune_kd.testing import launch

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_file)
    result = launch.run_distributed_recipe(
        config_file, nproc=nproc, recipe_file="recipes/knowledge_distillation_distributed.py", timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-6000:]


def refusal_before_weights(cfg: DictConfig, monkeypatch: Any, module: Optional[ModuleType] = None) -> str:
    """The pre-flight's refusal of ``cfg`` (its message), checking that no checkpoint loaded before it: the recipe's
    constructor must raise ``ConfigError`` with the Hugging Face checkpointers' loading patched to fail."""
    import pytest

    from torchtune_kd.errors import ConfigError

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint was loaded before the refusal")

    monkeypatch.setattr("torchtune.training.FullModelHFCheckpointer.load_checkpoint", no_weights)
    with pytest.raises(ConfigError) as refused:
        (module or load_recipe_module()).KDRecipeSingleDevice(cfg=cfg)
    return str(refused.value)


def assert_logged_values_equal(expected: dict, got: dict, *, rel: float = 1e-5, abs_tol: float = 1e-6) -> None:
    """Every step's value of every metric in ``expected`` (``run_logs.read_disk_log``: name -> step -> value) is in
    ``got`` and equal within the tolerances (``got`` may log more metrics)."""
    import pytest

    for key, values in expected.items():
        for step, value in values.items():
            assert got[key][step] == pytest.approx(value, rel=rel, abs=abs_tol), (key, step)


def assert_same_weights(expected: Any, got: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two models' state dicts are equal within the tolerances, tensor by tensor."""
    import torch

    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=name)
