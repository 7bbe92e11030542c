"""End-to-end tests: whole recipe runs (in-process and through ``tune run``), the demo, the benchmark, the wheel.

Every test here is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests of ``tests/unit/`` alone (the quick
loop; its budget is 90 s on 2 cores). A test that runs a recipe, lm-eval or a script's real work belongs here.
"""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every collected test under ``tests/e2e/`` ``slow``."""
    for item in items:
        if "/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
