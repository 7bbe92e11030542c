"""Session set-up: an offline environment and the deterministic local stand-in assets.

Environment (set at import, before any test module imports transformers, datasets or wandb):
``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``WANDB_MODE=offline``. The thread
count is deliberately left alone.

Fixtures (session scope, built once per test run):
    tiny_assets (dict): the manifest returned by ``standins.build_all`` for a fresh
        ``tmp_path_factory.mktemp("tiny_assets")`` folder, teacher not pre-trained. All paths in it are absolute
        **``str``** (wrap in ``pathlib.Path`` as needed). Stable keys:

        - ``root``, ``tokenizer_dir``, ``teacher_dir``, ``student_dir``: folders. ``tokenizer_dir`` holds
          ``tokenizer.model`` / ``tokenizer.json`` / ``tokenizer_config.json``; the model folders are Hugging Face
          Llama folders (``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer files).
        - ``data``: ``{"train", "eval", "heldout_text"}`` -> alpaca JSON lists (256 / 64 records) and a plain-text
          file of 64 held-out paragraphs.
        - ``vocab_size`` (1280), ``bpe_vocab_size`` (1024), ``num_special_tokens`` (256), ``bos_id``, ``eos_id``,
          ``pad_id``.
        - ``teacher_kwargs``, ``student_kwargs``: kwargs for ``torchtune.models.llama3.llama3`` (teacher 4 layers x
          128, student 2 layers x 64).
        - ``weights_sha256``: ``{"teacher", "student"}``; ``seeds``; ``num_train``, ``num_eval``, ``num_heldout``;
          ``teacher_pretrain_steps`` (0), ``teacher_pretrain_final_loss`` (None); ``params``; ``format_version``.
    assets_root (Path): ``Path(tiny_assets["root"])`` (``configs/tiny_cpu.yaml`` reads it via ``KD_ASSETS``).

Treat the assets as read-only: every test in the session shares them.

Skips are failures under CI (``CI`` set and not false) and under ``make test`` (``KD_REQUIRE_REAL_MODEL=1``): a suite
must not pass there because some of its checks did not run (the SmolLM2 GGUF missing, a W&B tool absent, ...).
Only the tests in :data:`ALLOWED_SKIPS`, whose skip depends on the machine rather than the install, may skip.
"""

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import pytest

# Never reach the hub or W&B's servers from tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"



@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stand-in assets' manifest (see the module docstring for its keys); built once per session."""
    from torchtune_kd.testing import standins

    return standins.build_all(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(scope="session")
def assets_root(tiny_assets: dict[str, Any]) -> Path:
    """The folder holding the stand-in assets (what ``KD_ASSETS`` points ``configs/tiny_cpu.yaml`` at)."""
    return Path(tiny_assets["root"])


# Test (node id without parameters) -> why it may skip even under CI.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/unit/test_configs.py::test_cuda_requested_without_gpu_is_named":
        "checks the message for a machine without a GPU; there is nothing to check where a GPU is present",
}


def strict_skips(environ: Mapping[str, str]) -> Optional[str]:
    """The setting under which a skipped test fails (``"CI=true"``, ``"KD_REQUIRE_REAL_MODEL=1"``), or None.

    Args:
        environ (Mapping[str, str]): the environment (``os.environ``).
    """
    if environ.get("KD_REQUIRE_REAL_MODEL", "") == "1":
        return "KD_REQUIRE_REAL_MODEL=1"
    ci = environ.get("CI", "")
    if ci.strip() and ci.strip().lower() not in ("0", "false", "no"):
        return f"CI={ci}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Turn a skip into a failure under :func:`strict_skips`, except for :data:`ALLOWED_SKIPS` (xfail stays)."""
    outcome = yield
    report = outcome.get_result()
    setting = strict_skips(os.environ)
    if setting is None or not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.nodeid.split("[", 1)[0] in ALLOWED_SKIPS:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{reason}\nUnder {setting} a skipped test is a failure, so a suite cannot pass without running its checks: "
        "install what the reason names (`make setup`), or add the test to ALLOWED_SKIPS in tests/conftest.py with "
        "the reason its skip depends on the machine."
    )
