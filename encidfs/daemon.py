"""The daemon: wires engine, process tracking, file table and FUSE adapter, and runs them."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from .config import Config
from .engine import new_hierarchy
from .files.table import FileTable
from .fuse.adapter import CgroupOperations, mount_options
from .procs import ProcessTracker

log = logging.getLogger(__name__)

# Entries and attributes may be cached this long; whatever changes them is invalidated at once.
CACHE_TIMEOUT = 1.0


async def serve(mountpoint: str, config: Config, ready: Callable[[], None]) -> None:
    """Mount, call ready(), and serve until unmounted or told to stop by SIGTERM/SIGINT."""
    hierarchy = new_hierarchy(config.capacities)

    def on_exit(pid: int) -> None:
        hierarchy.exit(pid)
        operations.flush_invalidations()

    tracker = ProcessTracker(on_exit)
    table = FileTable(hierarchy, tracker)
    table.root_xattrs[b"user.encidfs.pid"] = str(os.getpid()).encode()
    operations = CgroupOperations(table, CACHE_TIMEOUT)
    pyfuse3.init(operations, mountpoint, mount_options("encidfs", config.fuse_options))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            nursery.start_soon(_stop_on_signal)
            log.info("mounted on %s with %s", mountpoint, config.capacities)
            ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(mountpoint: str, config: Config, ready: Callable[[], None]) -> None:
    trio.run(serve, mountpoint, config, ready)
