"""What the install must (not) contain, and W&B offline logging of the same metric keys."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_utils import load_recipe_module, run_recipe, tiny_config


def test_peft_is_absent():
    # With peft installed, transformers 5 would apply a torchtune LoRA folder's adapter files on top of the merged
    # weights (logits off by ~0.4), and lm-eval would silently score the wrong model.
    assert importlib.util.find_spec("peft") is None


def test_pinned_versions():
    import torch
    import torchao
    import torchtune

    assert torchtune.__version__.startswith("0.6.1")
    assert torch.__version__.startswith("2.13.")
    major, minor = (int(x) for x in torchao.__version__.split(".")[:2])
    assert (major, minor) <= (0, 14) and (major, minor) != (0, 12)


def test_modules_import_from_the_checkouts_src():
    # kd_losses stays a top-level module (YAML says `_component_: kd_losses.X`); the rest is the torchtune_kd package.
    for name in ("kd_losses", "torchtune_kd.core.alignment", "torchtune_kd.core.loss_weighting",
                 "torchtune_kd.core.preflight", "torchtune_kd.core.loss_step", "torchtune_kd.evaluation.run_logs"):
        module = importlib.import_module(name)
        # One parent per dotted level above the module: src/kd_losses.py, src/torchtune_kd/core/alignment.py, ...
        assert Path(module.__file__).resolve().parents[name.count(".")].name == "src", module.__file__


def test_wandb_offline_run_carries_metrics_and_config(tiny_assets, assets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(assets_root, tmp_path / "run", ["max_steps_per_epoch=2"])
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "kd-test",
                         "log_dir": str(tmp_path)}
    run_recipe(cfg, load_recipe_module())
    runs = sorted(tmp_path.glob("**/offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))
    run_dir = runs[-1]
    assert list(run_dir.glob("run-*.wandb"))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        pytest.skip(f"wandb leet inspect unavailable: {result.stderr[-300:]}")
    text = result.stdout
    for key in ("ce_loss", "kd_loss", "ir_loss", "grad_norm", "weight/kd", "kd/teacher_entropy"):
        assert key in text, key
    assert "layer_mapping" in text
