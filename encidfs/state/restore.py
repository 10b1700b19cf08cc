"""Snapshots of the whole state, and the restore that a starting daemon runs."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..engine import snapshot as engine_snapshot
from . import v1
from .changes import Changes
from .store import StateStore

log = logging.getLogger(__name__)


def snapshot(changes: Changes) -> dict:
    return {"engine": engine_snapshot.dump(changes.hierarchy), "nodes": changes.table.dump(),
            "starts": {str(pid): start for pid, start in changes.starts.items()}}


def size(changes: Changes) -> int:
    """About how many entries a snapshot has (what a checkpoint costs)."""
    h = changes.hierarchy
    return len(h.by_id) + len(h.members) + len(changes.starts)


def restore(store: StateStore, changes: Changes,
            start_time_now: Callable[[int], int | None]) -> list[int]:
    """Rebuild the state from the store's file, drop the processes that are gone (or whose PID
    another process has now), compact the file, and journal into it from now on.  Return the
    PIDs to watch: members and holders."""
    store.snapshot = lambda: snapshot(changes)
    store.size = lambda: size(changes)
    data, records, old = store.open()
    h, table = changes.hierarchy, changes.table
    if old is not None:
        v1.restore(old, changes, start_time_now)
    else:
        if data is not None:
            engine_snapshot.load(h, data["engine"])
            table.load(data["nodes"])
            changes.starts = {int(pid): start for pid, start in data["starts"].items()}
        failed = changes.replay(records)
        if failed:
            log.warning("%d of %d journal records could not be replayed", failed, len(records))
    encids = changes.controller("encids")
    processes = sorted(set(h.members) | set(encids.holdings()))
    gone = [pid for pid in processes if start_time_now(pid) != changes.starts.get(pid)]
    for pid in gone:
        changes.exit(pid)
    table.drain()  # nothing is mounted yet: no cache to invalidate, nobody polls
    if old is not None:
        store.upgrade(old)
        log.info("%s: upgraded from state format 1", store.path)
    else:
        try:
            store.checkpoint()
        except OSError as error:
            log.warning("%s: not compacted (%s); changes are refused until it can be written",
                        store.path, error.strerror)
    changes.journal = store
    log.info("restored %d cgroups and %d processes from %s (%d gone since)", len(h.by_id),
             len(processes) - len(gone), store.path, len(gone))
    return [pid for pid in processes if pid not in gone]
