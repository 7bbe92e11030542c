"""A user's own KD loss honouring the token-sum contract works end to end; the README's example is the one tested."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

from torchtune_kd.testing.recipes import REPO, load_recipe_module, run_recipe, tiny_config
from torchtune_kd.core import preflight
from torchtune_kd.evaluation import run_logs

RECIPE = load_recipe_module()
UNCHUNKED = ["loss._component_=torch.nn.CrossEntropyLoss", "~loss.num_output_chunks", "~kd_loss.num_output_chunks",
             "~kd_loss.lambda_weight", "max_steps_per_epoch=2"]


@pytest.fixture()
def my_losses(tmp_path, monkeypatch):
    """The README's example block, written as the module ``my_losses`` on the path."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- custom-divergence-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "the README's custom divergence example is missing"
    (tmp_path / "my_losses.py").write_text(block.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_losses", None)
    import my_losses

    yield my_losses
    sys.modules.pop("my_losses", None)


def test_the_readme_example_is_exact(my_losses):
    loss = my_losses.HellingerLoss()
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 5, 6, 7]])
    total, count = loss.token_sum(student, teacher, labels)
    # Independent reference in float64 from the definition.
    p_s, p_t = torch.softmax(student.double(), -1), torch.softmax(teacher.double(), -1)
    reference = (1 - (p_s * p_t).sqrt().sum(-1))[labels != -100].sum()
    assert int(count) == 7 and float(total) == pytest.approx(float(reference), rel=1e-6)
    same, _ = loss.token_sum(student, student.clone(), labels)
    assert abs(float(same)) < 1e-6  # 0 when the distributions are equal


def test_a_users_divergence_trains_through_the_recipe(my_losses, tiny_assets, assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "run", [*UNCHUNKED, "kd_loss._component_=my_losses.HellingerLoss"])
    run_recipe(cfg, RECIPE)
    metrics = run_logs.read_disk_log(tmp_path / "run" / "logs")
    values = [v for _, v in metrics["kd_loss"]]
    assert len(values) == 2 and all(0 < v < 1 and math.isfinite(v) for v in values)


def test_a_loss_without_the_contract_is_refused(tiny_assets, assets_root, tmp_path):
    cfg = tiny_config(assets_root, tmp_path / "run", [*UNCHUNKED, "kd_loss._component_=torch.nn.KLDivLoss"])
    with pytest.raises(preflight.ConfigError, match=r"kd_loss._component_='torch.nn.KLDivLoss' has no token_sum"):
        preflight.validate_config(cfg, check_device=False)
