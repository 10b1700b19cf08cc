"""Polling with a deadline, for whatever a test waits on that happens elsewhere (a process's
exit, the daemon's answer, a mount going away).

tests/ is on the path of every test (pyproject's pytest `pythonpath`): `from waiting import
wait_until`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 10.0  # seconds: generous, only ever reached when something is broken


def poll(condition: Callable[[], T], timeout: float = DEADLINE) -> T:
    """condition()'s first true value, asked again after a growing delay; its last (false)
    value once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not (value := condition()) and time.monotonic() <= deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return value


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll condition() until it returns something true; fail with `what` at the deadline."""
    value = poll(condition, timeout)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value
