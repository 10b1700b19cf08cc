"""The request loop's read lock (encidfs/fuse/loop.py)."""

from __future__ import annotations

import pyfuse3
import trio
import trio.testing

from encidfs.fuse import loop


def test_a_free_lock_is_taken_without_yielding() -> None:
    async def take_twice() -> None:
        lock = loop.EagerLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                pass
            async with lock:
                pass

    trio.run(take_twice)


def test_a_held_lock_is_waited_for() -> None:
    order = []

    async def contend() -> None:
        lock = loop.EagerLock()

        async def holder(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with lock:
                task_status.started()
                await trio.testing.wait_all_tasks_blocked()  # the waiter waits
                order.append("holder out")

        async def waiter() -> None:
            async with lock:
                order.append("waiter in")

        async with trio.open_nursery() as nursery:
            await nursery.start(holder)
            nursery.start_soon(waiter)

    trio.run(contend)
    assert order == ["holder out", "waiter in"]


def test_pyfuse3_is_given_trio_with_the_eager_lock() -> None:
    saved = pyfuse3.trio  # type: ignore[attr-defined]
    try:
        loop.install()
        assert pyfuse3.trio.Lock is loop.EagerLock  # type: ignore[attr-defined]
        assert pyfuse3.trio.lowlevel is trio.lowlevel  # type: ignore[attr-defined]
        assert pyfuse3.trio.ClosedResourceError is trio.ClosedResourceError  # type: ignore[attr-defined]
    finally:
        pyfuse3.trio = saved  # type: ignore[attr-defined]
