"""What the control socket does: allocate and free IDs for processes, and report the state.

A request runs to completion synchronously against the engine, so concurrent clients see the
charges one after the other, as callers of the kernel's misc_cg_try_charge() would.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import U64_MAX, ChargeRefused, Engine, fail
from ..procs import ProcessTracker
from ..state.changes import Changes
from .protocol import error_reply

if TYPE_CHECKING:
    from ..metrics import RequestMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """The client, as SO_PEERCRED tells it."""

    pid: int
    uid: int
    gid: int


class ControlService:
    def __init__(self, mountpoint: str, engine: Engine, tracker: ProcessTracker,
                 changes: Changes, changed: Callable[[], None],
                 restarts: list[dict] | None = None, limitations: list[str] = (),
                 capacity_source: str | None = None) -> None:
        self.mountpoint = mountpoint
        self.hierarchy = engine.hierarchy
        self.allocator = engine.allocator
        self.types = engine.types
        self.tracker = tracker
        self.changes = changes  # allocations and frees are journalled before they happen
        self.restarts = restarts or []  # the supervisor's: when the daemon died, and how
        self.limitations = list(limitations)  # what the daemon would do but cannot
        self.capacity_source = capacity_source  # where the capacities came from
        self.owner_uid = os.geteuid()
        self._changed = changed  # tells the file system that the engine changed
        self._ops = {"allocate": self._allocate, "free": self._free, "status": self._status}
        self.metrics: RequestMetrics | None = None  # with --metrics: requests counted, timed

    def handle(self, request: dict, peer: Peer) -> dict:
        name = request.get("op")
        op = self._ops.get(name) if isinstance(name, str) else None
        if op is None:
            return error_reply(errno.EINVAL, f"unknown op {request.get('op')!r}")
        if self.metrics is None:
            return self._handle(op, request, peer)
        start = time.perf_counter()
        try:
            return self._handle(op, request, peer)
        finally:
            self.metrics.observe("control", str(name), time.perf_counter() - start)

    def _handle(self, op: Callable[[dict, Peer], dict], request: dict, peer: Peer) -> dict:
        try:
            return {"ok": True, **op(request, peer)}
        except ChargeRefused as refusal:
            return {**error_reply(errno.EBUSY, refusal.strerror, refusal.path),
                    "controller": refusal.controller}
        except OSError as error:
            return error_reply(error.errno or errno.EIO, error.strerror or str(error))
        except Exception:  # a bug: this request fails, the daemon goes on
            log.exception("control request %r failed", request)
            return error_reply(errno.EIO, "internal error (logged by the daemon)")
        finally:
            self._changed()

    def _allocate(self, request: dict, peer: Peer) -> dict:
        type_name = request.get("type")
        count = request.get("count", 1)
        pid = request.get("pid", peer.pid)
        if not isinstance(type_name, str) or not _whole(count) or not _whole(pid) or pid <= 0:
            raise fail(errno.EINVAL, "allocate takes a type, a count >= 1 and a PID")
        self.tracker.sync()  # a holder forked a moment ago must be charged where it was born
        holder = self.tracker.thread_group(pid)
        self._check_may_act_for(peer, holder)
        # Watched from now on, and alive now: an exit still on its way is settled first, so
        # that the charge goes to the cgroup the process is in, or to none (a zombie's).
        start = self.tracker.watch(holder)
        if start is None:
            raise fail(errno.ESRCH, f"process {holder} has exited")
        cg = self.hierarchy.cgroup_of(holder)
        if cg.is_root and not self._owner(peer):
            raise fail(errno.EPERM, f"process {holder} is in the root cgroup: only the mount's "
                                    "owner charges the root, others' processes are placed first")
        ids = self.changes.run("allocate", holder, start, type_name, count)
        return {"type": type_name, "ids": ids, "holder": holder, "cgroup": cg.path}

    def _free(self, request: dict, peer: Peer) -> dict:
        """Free IDs of one holder: the holder itself asks, or the mount's owner does."""
        ids = request.get("ids")
        holder = request.get("pid", peer.pid)
        if not isinstance(ids, list) or not ids or not all(_whole(i) for i in ids) \
                or not _whole(holder):
            raise fail(errno.EINVAL, "free takes a list of IDs and their holder's PID")
        if holder != peer.pid and not self._owner(peer):
            raise fail(errno.EPERM, "only the holder or the mount's owner frees its IDs")
        # A stale request (its holder gone, the IDs handed out again) names the wrong holder.
        foreign = [i for i in ids if self.allocator.holder_of(i) != holder]
        if foreign:
            raise fail(errno.EINVAL, f"not held by process {holder}: {foreign}")
        self.changes.run("free", ids)
        return {"ids": ids, "holder": holder}

    def _status(self, request: dict, peer: Peer) -> dict:
        self.tracker.sync()
        types = self.types
        cgroups = []
        for cg in self.hierarchy.subtree(self.hierarchy.root):
            entry: dict = {"path": cg.path, "procs": sorted(cg.procs or ()),
                           "populated": cg.populated}
            for controller in self.allocator.controllers:
                css = cg.css[controller.ssid]
                if css is not None:
                    entry[controller.name] = {
                        name: {"max": _limit(css.max[t]), "current": css.usage[t],  # type: ignore[attr-defined]
                               "peak": css.peak[t], "events": css.events[t],  # type: ignore[attr-defined]
                               "events_local": css.events_local[t],  # type: ignore[attr-defined]
                               "capacity": types.capacity[t]}
                        for t, name in enumerate(types.names)}
            cgroups.append(entry)
        holders: dict[tuple, list[int]] = {}
        for pid, ids in sorted(self.allocator.holdings().items()):
            for id_ in sorted(ids):
                allocation = self.allocator.allocation_of(id_)
                assert allocation is not None
                charged = tuple((controller.name, charge.cgroup.path) for controller, charge
                                in zip(self.allocator.controllers, allocation.charges))
                key = (pid, types.names[allocation.type], allocation.origin.path, charged)
                holders.setdefault(key, []).append(id_)
        return {"mountpoint": self.mountpoint, "tracking": self.tracker.mode,
                "limitations": self.limitations, "restarts": self.restarts,
                "capacities": dict(zip(types.names, types.capacity)),
                "capacity_source": self.capacity_source,
                "controllers": [c.name for c in self.allocator.controllers],
                "cgroups": sorted(cgroups, key=lambda c: c["path"]),
                "holders": [{"pid": pid, "type": t, "cgroup": origin, "charged": dict(charged),
                             "ids": ids}
                            for (pid, t, origin, charged), ids in holders.items()]}

    def _owner(self, peer: Peer) -> bool:
        """Root, or the user who mounted (the daemon runs as the mount's owner)."""
        return peer.uid in (0, self.owner_uid)

    def _check_may_act_for(self, peer: Peer, pid: int) -> None:
        if peer.uid != 0 and peer.uid not in self.tracker.owners(pid):
            raise fail(errno.EPERM, f"process {pid} belongs to another user")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _limit(value: int) -> int | str:
    return "max" if value == U64_MAX else value
