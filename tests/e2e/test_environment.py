"""W&B offline logging of a recipe run carries the same metric keys as the disk log, and the config."""

import subprocess
import sys
from pathlib import Path

import pytest

from torchtune_kd.testing.recipes import load_recipe_module, run_recipe, tiny_config


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
