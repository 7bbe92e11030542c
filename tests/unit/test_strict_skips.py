"""Under CI (and ``make test``) a skipped test fails, except the allow-listed ones (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUITE = {
    "test_sample.py": (
        "import pytest\n\n"
        "def test_passes():\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='needs the GGUF')\n"
        "def test_marked_skip():\n    pass\n\n"
        "def test_skips_itself():\n    pytest.skip('tool unavailable')\n\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_expected_failure():\n    assert False\n"
    ),
    # The allow-listed test, at the node id the allow-list names.
    "unit/test_configs.py": "import pytest\n\ndef test_cuda_requested_without_gpu_is_named():\n    pytest.skip('a GPU is present')\n",
}


def run_suite(tmp_path: Path, **env: str) -> dict[str, str]:
    """Run the small suite with the project's conftest; return each test's outcome from ``-rA``'s summary."""
    root = tmp_path / "suite"
    (root / "tests" / "unit").mkdir(parents=True)
    shutil.copyfile(CONFTEST, root / "tests" / "conftest.py")
    for name, text in SUITE.items():
        (root / "tests" / name).write_text(text)
    (root / "pytest.ini").write_text("[pytest]\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "KD_REQUIRE_REAL_MODEL", "PYTEST_ADDOPTS")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "tests"],
        # Without plugin autoload the run takes well under a second; the conftest needs no plugin.
        cwd=root, env={**environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **env}, capture_output=True, text=True,
        timeout=120,
    )
    outcomes = {}
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL") and "::" in rest:
            outcomes[rest.split(" ")[0].split("::")[-1]] = word
    return {"stdout": proc.stdout, **outcomes}


@pytest.mark.parametrize("env", [{}, {"CI": "false"}])
def test_skips_stay_skips_outside_ci(tmp_path, env):
    result = run_suite(tmp_path, **env)
    assert result["test_passes"] == "PASSED" and result["test_expected_failure"] == "XFAIL"
    assert "3 skipped" in result["stdout"] and "error" not in result["stdout"], result["stdout"]


@pytest.mark.parametrize("env", [{"CI": "true"}, {"KD_REQUIRE_REAL_MODEL": "1"}])
def test_skips_fail_under_ci_except_the_allow_listed(tmp_path, env):
    result = run_suite(tmp_path, **env)
    out = result["stdout"]
    # A skipif mark is decided at set-up, so it fails there (an error); pytest.skip() in the body fails the test.
    assert result["test_marked_skip"] == "ERROR" and result["test_skips_itself"] == "FAILED", out
    assert "needs the GGUF" in out and "tool unavailable" in out and "a skipped test is a failure" in out
    assert result["test_passes"] == "PASSED" and result["test_expected_failure"] == "XFAIL"
    assert "1 skipped" in out, out  # the allow-listed test
