"""The wheel: built from pyproject.toml, it carries the package, ``kd_losses`` and the package data, and works
installed away from the checkout.

The installed copy is tried in a scratch virtual environment that sees the project's dependencies (torch,
torchtune, lm-eval, ...) but not the project itself: neither the checkout's ``src/`` (the editable install) nor its
``recipes`` hook, and with a working directory outside the checkout. About 15 s on 2 CPU cores (the build, the
scratch environment, importing torch and lm-eval there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from torchtune_kd.evaluation import lm_eval_tasks

REPO = Path(__file__).resolve().parents[2]

# Runs inside the scratch environment: argv = [config, folder for the task YAMLs]; prints what it found as JSON.
PROBE = r"""
import json
import sys
from pathlib import Path

start_path = list(sys.path)  # as the interpreter set it up, before any import could extend it

import yaml
from omegaconf import OmegaConf

import kd_losses
import torchtune_kd
from torchtune_kd.core import preflight
from torchtune_kd.evaluation import lm_eval_tasks

facts = preflight.validate_config(OmegaConf.load(sys.argv[1]), check_files=False, check_device=False)
written = lm_eval_tasks.write_offline_task_yamls(Path(sys.argv[2]))
data_files = [
    file
    for path in written.values()
    for file in yaml.safe_load(path.read_text(encoding="utf-8"))["dataset_kwargs"]["data_files"].values()
]
print(json.dumps({
    "torchtune_kd": torchtune_kd.__file__,
    "kd_losses": kd_losses.__file__,
    "preflight": preflight.__file__,
    "data_dir": str(lm_eval_tasks.OFFLINE_DATA_DIR),
    "data_files": data_files,
    "facts": facts is not None,
    "start_path": start_path,
    "sys_path": sys.path,
}))
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline with the project environment's setuptools."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the build reads (pyproject.toml, its readme, src/): setuptools builds in place and
    # reuses build/lib/, so modules left there by an earlier build (the old flat src/*.py) could slip into a wheel
    # built in the checkout itself, and the build would write build/ and *.egg-info into a shared working tree.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir",
          str(dist), str(source)])
    wheels = sorted(dist.glob("torchtune_kd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_package_kd_losses_and_the_task_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        path.relative_to(REPO / "src").as_posix()
        for path in (REPO / "src").rglob("*.py")
        if "__pycache__" not in path.parts and not any(part.endswith(".egg-info") for part in path.parts)
    }
    assert "kd_losses.py" in sources and "torchtune_kd/__init__.py" in sources
    assert sources <= names, sorted(sources - names)
    data = "torchtune_kd/evaluation/task_data"
    expected = {f"{data}/README.md"} | {
        f"{data}/{spec.folder}/{split}.jsonl"
        for spec in lm_eval_tasks.OFFLINE_TASKS.values()
        for split in spec.splits.values()
    }
    assert expected <= names, sorted(expected - names)
    # Only the project's own top-level names: no tests, recipes, scripts or leftovers of the old flat layout.
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"kd_losses.py", "torchtune_kd"}, top_level


@pytest.fixture(scope="module")
def scratch_python(wheel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(python, site-packages)`` of a scratch environment with the wheel installed and the project's dependencies
    visible."""
    venv = tmp_path_factory.mktemp("scratch") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    site = Path(purelib.strip())
    # A plain path line puts the project environment's site-packages on sys.path *after* the scratch one. Its own
    # .pth files (the editable install pointing at the checkout's src/, the recipes hook) are processed only for
    # site directories, so they stay inert here: torchtune_kd can only come from the wheel.
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "project_dependencies.pth").write_text("\n".join(dependencies) + "\n", encoding="utf-8")
    # --target (implies --ignore-installed): the project environment's editable torchtune_kd, visible through the
    # line above, is neither seen as already installed nor touched.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    return python, site


def test_installed_wheel_works_without_the_checkout(scratch_python, tmp_path):
    python, site = scratch_python
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    # -I: neither PYTHONPATH nor the user site nor the working directory / script folder on sys.path.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    result = _run([str(python), "-I", str(probe), str(REPO / "configs" / "distillation.yaml"), str(tmp_path / "yamls")],
                  cwd=tmp_path, env=env)
    found = json.loads(result.stdout.strip().splitlines()[-1])

    site = site.resolve()
    for key in ("torchtune_kd", "kd_losses", "preflight"):
        assert site in Path(found[key]).resolve().parents, (key, found[key])
    # Nothing of the checkout on sys.path but the project environment's site-packages (which lives inside it).
    allowed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    entries = [Path(p).resolve() for p in found["start_path"] if p]
    checkout = [p for p in entries if p.is_relative_to(REPO) and p not in allowed]
    assert not checkout, found["start_path"]
    assert str(REPO / "src") not in found["sys_path"] and str(REPO) not in found["sys_path"], found["sys_path"]
    assert found["facts"]  # pre-flight built both models (on the meta device) from the shipped config

    data_dir = Path(found["data_dir"])
    assert data_dir == site / "torchtune_kd" / "evaluation" / "task_data"
    expected = sum(len(spec.splits) for spec in lm_eval_tasks.OFFLINE_TASKS.values())
    assert len(found["data_files"]) == expected
    for file in map(Path, found["data_files"]):
        assert data_dir in file.parents and file.is_file(), file
