"""pyfuse3's request loop on trio, one scheduler pass a request instead of two.

Before each request pyfuse3 takes its read lock, and trio.Lock yields to the scheduler even
when it is free: an extra pass (an epoll_wait and trio's bookkeeping) for every request, a
tenth of a read's time.  The daemon runs one worker, so the lock is always free; taking it
need not yield, as the wait for the request that follows is the loop's checkpoint.  pyfuse3
looks trio up as its module attribute `trio` (pyfuse3.asyncio swaps it the same way):
install() gives it trio with that lock.
"""

from __future__ import annotations

import types

import pyfuse3
import trio


class EagerLock:
    """trio.Lock that yields only to wait: taken at once when free."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _TrioWithEagerLock(types.ModuleType):
    Lock = EagerLock

    def __getattr__(self, name: str) -> object:
        return getattr(trio, name)


def install() -> None:
    """Before pyfuse3.main()."""
    pyfuse3.trio = _TrioWithEagerLock("trio")  # type: ignore[attr-defined]
