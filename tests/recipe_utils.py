"""Helpers for running the distillation recipe in-process on the tiny stand-ins."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
RECIPE_PATH = REPO / "recipes" / "knowledge_distillation_single_device.py"
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def load_recipe_module():
    """Import our recipe file under a unique name (torchtune installs its own top-level ``recipes`` package)."""
    spec = importlib.util.spec_from_file_location("kd_recipe_single_device", RECIPE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(
    assets: Path, output_dir: Path, overrides: Iterable[str] = (), *, config: Path = TINY_CONFIG
) -> DictConfig:
    """A config (default configs/tiny_cpu.yaml) with the stand-ins' folder and the output folder filled in, plus
    command-line overrides merged by torchtune's own command-line code.

    So every tested config is one a user can reproduce with ``tune run ... --config <yaml> <overrides>``: on a
    section with a ``_component_``, ``key=X`` sets ``key._component_`` (``key=None`` switches an optional section
    off), ``~key.sub`` removes a key, and removing a whole component is refused as ``tune run`` refuses it.
    """
    from argparse import Namespace

    from torchtune.config._utils import _merge_yaml_and_cli_args

    os.environ["KD_ASSETS"] = str(assets)
    yaml = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    cfg = _merge_yaml_and_cli_args(Namespace(**yaml), [f"output_dir={output_dir}", *overrides])
    # Resolve now: the env vars are per-test.
    OmegaConf.resolve(cfg)
    return cfg


def run_recipe(cfg: DictConfig, module: Optional[Any] = None):
    module = module or load_recipe_module()
    recipe = module.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


LORA_OVERRIDES = (
    "model._component_=torchtune.models.llama3.lora_llama3",
    "model.lora_attn_modules=[q_proj,v_proj,output_proj]",
    "model.apply_lora_to_mlp=true",
    "model.apply_lora_to_output=false",
    "model.lora_rank=8",
    "model.lora_alpha=16",
    "model.lora_dropout=0.0",
)
