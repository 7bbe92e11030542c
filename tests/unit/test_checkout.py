"""A second checkout sharing the first one's virtualenv is told that the other checkout's code runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torchtune_kd import checkout

REPO = Path(__file__).resolve().parents[2]


def make_checkout(root: Path) -> Path:
    (root / "src" / "torchtune_kd").mkdir(parents=True)
    (root / "src" / "torchtune_kd" / "__init__.py").write_text("")
    (root / "recipes").mkdir()
    (root / "recipes" / "__init__.py").write_text("")
    return root


def test_the_checkout_root_is_found_from_a_subfolder(tmp_path):
    root = make_checkout(tmp_path / "kd")
    (root / "scripts").mkdir()
    assert checkout.checkout_root(root / "scripts") == root.resolve()
    assert checkout.checkout_root(tmp_path) is None


def test_a_working_folder_in_another_checkout_is_reported(tmp_path):
    other = make_checkout(tmp_path / "second")
    package = REPO / "src" / "torchtune_kd" / "__init__.py"
    assert checkout.foreign_checkouts(package, [other, REPO]) == [other.resolve()]
    assert checkout.foreign_checkouts(package, [REPO / "scripts", tmp_path]) == []


def test_importing_the_package_from_another_checkout_warns_on_stderr(tmp_path):
    other = make_checkout(tmp_path / "second")
    env = {k: v for k, v in os.environ.items() if k != checkout.ENV_SILENCE}
    run = subprocess.run([sys.executable, "-c", "import torchtune_kd"], cwd=other, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0
    assert str(other.resolve()) in run.stderr and "other checkout's code runs" in run.stderr
    quiet = subprocess.run([sys.executable, "-c", "import torchtune_kd"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert "other checkout" not in quiet.stderr
