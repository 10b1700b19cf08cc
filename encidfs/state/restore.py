"""Snapshots of the whole state, and the restore that a starting daemon runs."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..engine import snapshot as engine_snapshot
from . import v1
from .changes import Changes
from .store import StateStore, boot_id

log = logging.getLogger(__name__)


def snapshot(changes: Changes) -> dict:
    return {"engine": engine_snapshot.dump(changes.hierarchy, changes.allocator),
            "nodes": changes.kernfs.dump(),
            "starts": {str(pid): start for pid, start in changes.starts.items()},
            "boot": boot_id()}  # the boot whose clock the freezing times are on


def size(changes: Changes) -> int:
    """About how many entries a snapshot has (what a checkpoint costs)."""
    h = changes.hierarchy
    return len(h.by_id) + len(h.procs.members) + len(changes.starts)


def restore(store: StateStore, changes: Changes,
            start_time_now: Callable[[int], int | None]) -> list[int]:
    """Rebuild the state from the store's file, drop the processes that are gone (or whose PID
    another process has now) and compact the file, which keeps the changes' journal from now
    on.  Return the PIDs to watch: members and holders."""
    data, records, old = store.open(lambda: snapshot(changes), lambda: size(changes))
    h, kernfs = changes.hierarchy, changes.kernfs
    if old is not None:
        v1.restore(old, changes, start_time_now)
    else:
        if data is not None:
            engine_snapshot.load(h, changes.allocator, _upgrade(data["engine"]))
            kernfs.load(data["nodes"])
            changes.starts = {int(pid): start for pid, start in data["starts"].items()}
        failed = changes.replay(records)
        if failed:
            log.warning("%d of %d journal records could not be replayed", failed, len(records))
        if data is not None and data.get("boot") != boot_id():
            h.freezer.restart_freezing_clock()
    processes = sorted(set(h.procs.members) | set(changes.allocator.holdings()))
    gone = [pid for pid in processes if start_time_now(pid) != changes.starts.get(pid)]
    for pid in gone:
        changes.exit(pid)
    kernfs.consume(h.drain_events())  # nothing is mounted yet: no cache, nobody polls
    if old is not None:
        old.close()
    try:
        store.checkpoint()  # the file in this release's schema, holding just the state now
    except OSError as error:
        log.warning("%s: not compacted (%s); changes are refused until it can be written",
                    store.path, error.strerror)
    else:
        if old is not None:
            log.info("%s: upgraded from state format 1", store.path)
    log.info("restored %d cgroups and %d processes from %s (%d gone since)", len(h.by_id),
             len(processes) - len(gone), store.path, len(gone))
    return [pid for pid in processes if pid not in gone]


def _upgrade(engine: dict) -> dict:
    """A snapshot of the first journalled release (schema 2) had only encids, whose charges
    it kept per controller: as allocations, they are charged to every controller now."""
    if "allocations" in engine or "charges" not in engine:
        return engine
    origin = {index: css[1] for index, css in enumerate(engine["csses"])}
    engine = dict(engine)
    engine["allocations"] = [[type_name, holder, origin[css], ids, {"encids": css}]
                             for css, type_name, holder, ids in engine.pop("charges")["encids"]]
    return engine
