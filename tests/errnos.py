"""Expecting an errno: the engine, the file table and the journal refuse with an OSError
carrying the kernel's code, and that code is what a test checks."""

from __future__ import annotations

import pytest


def raises_errno(code: int) -> pytest.RaisesExc[OSError]:
    """pytest.raises for an OSError carrying exactly `code`."""
    return pytest.raises(OSError, check=lambda e: e.errno == code)
