"""End-to-end tests: whole recipe runs (in-process and through ``tune run``), the demo, the benchmark, the wheel.

Every test here is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests of ``tests/unit/`` alone in about a
minute.
"""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
