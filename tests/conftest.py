"""What every test directory shares: the `mount` marker, put on every test that mounts
encidfs so that `make test-fast` can leave them out by a marker, not a list of paths."""

from __future__ import annotations

from pathlib import Path

import pytest

MOUNTING = [Path(__file__).parent / name for name in ("mount", "example")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.path.is_relative_to(directory) for directory in MOUNTING):
            item.add_marker(pytest.mark.mount)
