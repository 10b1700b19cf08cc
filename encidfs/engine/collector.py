"""Python's cyclic garbage collector held off while a large copy of the state is made.

The copies are of the engine (a status reply on the control socket, a metrics snapshot), so it
lives beside it, where both the control socket and the daemon's exporter can import it."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Without the collector: its passes over the heap, which making many small objects sets
    off again and again, took half the time of a copy of 10,000 cgroups (measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
