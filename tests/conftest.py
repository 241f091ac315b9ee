"""The two layers: tests/unit runs in-process; everything under tests/e2e starts real processes
and is marked `e2e`, so `pytest -m "not e2e"` runs the fast layer alone."""

from __future__ import annotations

from pathlib import Path

import pytest

E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
