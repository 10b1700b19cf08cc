"""Fixtures the engine tests share: an engine of the encids controller alone, 8 SEV IDs, its
hierarchy and its allocator.  A module that needs other capacities or controllers defines its
own `engine`; `h` and `allocator` follow it.

Every hypothesis state machine is `slow`: it runs hundreds of examples, seconds each."""

from __future__ import annotations

import pytest

from encidfs.engine import Allocator, Engine, Hierarchy, new_engine


@pytest.fixture
def engine() -> Engine:
    return new_engine({"sev": 8})


@pytest.fixture
def h(engine: Engine) -> Hierarchy:
    return engine.hierarchy


@pytest.fixture
def allocator(engine: Engine) -> Allocator:
    return engine.allocator


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # A machine's TestCase runs it from runTest, which hypothesis tags with the machine.
        run = getattr(getattr(item, "cls", None), "runTest", None)
        if hasattr(run, "_hypothesis_state_machine_class"):
            item.add_marker(pytest.mark.slow)
