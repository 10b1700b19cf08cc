"""What the control socket does: allocate and free IDs for processes, and report the state.

Concurrent clients see the charges one after the other, as callers of the kernel's
misc_cg_try_charge() would.  Allocations and frees are group-committed: the server hands over
every request its clients sent meanwhile (see server.py), and each run of allocations and
frees among them is checked, journalled in one commit, and applied in the journal's order, and
only then is any of it answered.  A change refused when applied (a charge over a limit reached
by one before it in the group) is refused again on replay, in the same order.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..engine import ChargeRefused, Engine, collector, fail
from ..procs.watcher import ProcessWatcher
from ..state.changes import Changes
from ..state.operations import Op
from .protocol import error_reply

log = logging.getLogger(__name__)

T = TypeVar("T")


class Metrics(Protocol):
    """What a request is counted and timed in (daemon/metrics.py RequestMetrics)."""

    def observe(self, interface: str, kind: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Peer:
    """The client, as SO_PEERCRED tells it."""

    pid: int
    uid: int
    gid: int


@dataclass
class _Checked:
    """A checked allocate or free: its journal record, the holder that must still be alive
    when it is applied (with its start time), and the reply made of what it returned."""

    record: tuple
    holder: tuple[int, int] | None
    reply: Callable[[object], dict]


@dataclass
class _Waiting:
    """A request in a group commit."""

    op: Callable[[dict, Peer], _Checked]
    request: dict
    peer: Peer
    reply: dict | None = None  # once its group is committed

    def made(self) -> dict:
        assert self.reply is not None
        return self.reply


class ControlService:
    def __init__(self, mountpoint: str, engine: Engine, tracker: ProcessWatcher,
                 changes: Changes, changed: Callable[[], None],
                 restarts: list[dict] | None = None, limitations: Sequence[str] = (),
                 capacity_source: str | None = None, metrics: Metrics | None = None) -> None:
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
        self.metrics = metrics  # with --metrics: requests counted, timed

    def answer_all(self, requests: list[tuple[dict, Peer]]) -> list[dict]:
        """The replies to requests that came together, in their order: each run of
        allocations and frees is one group commit, and a status sees what came before it.

        Statuses with no change between them share one reply: the state is the same for all,
        and a status costs the size of the tree, so that many clients asking at once cost
        the event loop one status a round, not one each."""
        replies: list[dict | _Waiting] = []
        group: list[_Waiting] = []
        statuses: dict[bool, dict] = {}  # made since the last change, by sparseness
        for request, peer in requests:
            name = request.get("op")
            if name in ("allocate", "free"):
                waiting = _Waiting(self._allocate if name == "allocate" else self._free,
                                   request, peer)
                group.append(waiting)
                replies.append(waiting)
                continue
            if group:
                self._commit_group(group)
                group = []
                statuses.clear()
            if name == "status":
                start = time.perf_counter()
                sparse = request.get("sparse") is True
                if sparse not in statuses:
                    with collector.paused():  # a large tree's reply is many small objects
                        statuses[sparse] = self._answer(
                            lambda: {"ok": True, **self._status(sparse)}, request)
                replies.append(self._seen_by(peer, statuses[sparse]))
                self._observe(["status"], start)
            elif name == "cgroup":
                replies.append(self._answer(lambda: self._cgroup(request, peer), request))
            else:
                replies.append(error_reply(errno.EINVAL, f"unknown op {request.get('op')!r}"))
        self._commit_group(group)
        return [reply if isinstance(reply, dict) else reply.made() for reply in replies]

    def _observe(self, names: list[str], start: float) -> None:
        if self.metrics is not None:
            seconds = time.perf_counter() - start
            for name in names:
                self.metrics.observe("control", name, seconds)

    def _commit_group(self, group: list[_Waiting]) -> None:
        """Check, journal, apply, in that order; then the group's replies are made."""
        if not group:
            return
        start = time.perf_counter()
        try:
            self.tracker.sync()  # a holder forked a moment ago is charged where it was born
            checked: list[tuple[_Waiting, _Checked]] = []
            for waiting in group:
                change = self._answer(lambda: waiting.op(waiting.request, waiting.peer),
                                      waiting.request)
                if isinstance(change, _Checked):
                    checked.append((waiting, change))
                else:
                    waiting.reply = change
            # The checks of later requests may have seen an earlier one's holder exit.
            alive = []
            for waiting, change in checked:
                if change.holder is None or self.tracker.follows(*change.holder):
                    alive.append((waiting, change))
                else:
                    waiting.reply = error_reply(errno.ESRCH,
                                                f"process {change.holder[0]} has exited")
            outcomes = self.changes.run_all([change.record for _, change in alive])
            for (waiting, change), outcome in zip(alive, outcomes):
                waiting.reply = self._answer(
                    lambda: {"ok": True, **change.reply(outcome.unwrap())}, waiting.request)
        except Exception:  # a bug: these requests fail (EIO below), the daemon goes on
            log.exception("control requests %r failed", [w.request for w in group])
        finally:
            self._changed()
            for waiting in group:
                if waiting.reply is None:
                    waiting.reply = error_reply(errno.EIO, "internal error (logged by the "
                                                           "daemon)")
            self._observe([waiting.request["op"] for waiting in group], start)

    def _answer(self, work: Callable[[], T], request: dict) -> T | dict:
        """What work() returns, or the error reply for what it raised."""
        try:
            return work()
        except ChargeRefused as refusal:
            return {**error_reply(errno.EBUSY, refusal.strerror, refusal.path),
                    "controller": refusal.controller}
        except OSError as error:
            return error_reply(error.errno or errno.EIO, error.strerror or str(error))
        except Exception:  # a bug: this request fails, the daemon goes on
            log.exception("control request %r failed", request)
            return error_reply(errno.EIO, "internal error (logged by the daemon)")

    def _allocate(self, request: dict, peer: Peer) -> _Checked:
        type_name = request.get("type")
        count = request.get("count", 1)
        pid = request.get("pid", peer.pid)
        guest_name = request.get("guest")
        if not isinstance(type_name, str) or not _whole(count) or not _whole(pid) or pid <= 0 \
                or not isinstance(guest_name, (str, type(None))):
            raise fail(errno.EINVAL, "allocate takes a type, a count >= 1, a PID and a guest")
        if "pid" in request:  # named in the client's PID namespace
            pid = self.tracker.pid_from(peer.pid, pid)
        holder = self.tracker.thread_group(pid)
        self._check_may_act_for(peer, holder)
        # Watched from now on, and alive now: an exit still on its way is settled first, so
        # that the charge goes to the cgroup the process is in, or to none (a zombie's).
        start = self.tracker.watch(holder)
        if start is None:
            raise fail(errno.ESRCH, f"process {holder} has exited")
        cg = self.hierarchy.membership.cgroup_of(holder)
        if cg.is_root and not self._owner(peer):
            raise fail(errno.EPERM, f"process {holder} is in the root cgroup: only the mount's "
                                    "owner charges the root, others' processes are placed first")
        if count < 1:  # the allocator's own checks, before the request is journalled
            raise fail(errno.EINVAL, "count must be at least 1")
        guest = self.allocator.guest(type_name, guest_name).name
        (named,) = self.tracker.pids_for(peer.pid, [holder])
        return _Checked((Op.ALLOCATE, holder, start, type_name, count, cg.id, guest),
                       (holder, start),
                       lambda ids: {"type": type_name, "guest": guest, "ids": ids,
                                    "holder": named, "cgroup": cg.path})

    def _free(self, request: dict, peer: Peer) -> _Checked:
        """Free IDs of one holder, for a client that may act for it (as for allocating)."""
        ids = request.get("ids")
        named = holder = request.get("pid", peer.pid)
        if not isinstance(ids, list) or not ids or not all(_whole(i) for i in ids) \
                or not _whole(holder):
            raise fail(errno.EINVAL, "free takes a list of IDs and their holder's PID")
        if "pid" in request:  # named in the client's PID namespace
            holder = self.tracker.pid_from(peer.pid, holder)
        # A stale request (its holder gone, the IDs handed out again) names the wrong holder.
        # Checked before the permission: a holder that exited holds nothing, whoever asks,
        # and has no UIDs left to check.
        foreign = [i for i in ids if self.allocator.holder_of(i) != holder]
        if foreign:
            raise fail(errno.EINVAL, f"not held by process {named}: {foreign}")
        self._check_may_act_for(peer, holder)
        return _Checked((Op.FREE, ids), None, lambda _: {"ids": ids, "holder": named})

    def _cgroup(self, request: dict, peer: Peer) -> dict:
        """The cgroup of a task, as its /proc/PID/cgroup would name it.  The task is named in
        the client's PID namespace, or with `seen_by` in that process's."""
        task, seen_by = request.get("pid"), request.get("seen_by", peer.pid)
        if not _whole(task) or not _whole(seen_by) or not task or not seen_by:
            raise fail(errno.EINVAL, "cgroup takes a PID (and the PID of who names it)")
        if "seen_by" in request:
            seen_by = self.tracker.pid_from(peer.pid, seen_by, thread=True)
        task = self.tracker.pid_from(seen_by, task, thread=True)
        self.tracker.sync()
        tgid = self.tracker.thread_group(task)
        return {"ok": True, "cgroup": self.hierarchy.membership.thread_cgroup(tgid, task).path}

    def _status(self, sparse: bool) -> dict:
        """Sparse, what a new cgroup has is left out: a type whose figures are
        all as a new cgroup's (no limit, nothing used or refused), and `procs` and `populated`
        when it has no processes and is not populated.  A large tree's reply is mostly made of
        such cgroups: sparse, it takes a quarter of the time to make and to read."""
        self.tracker.sync()
        types = self.types
        controllers = self.hierarchy.controllers
        cgroups = []
        for cg, path in self.hierarchy.subtree_paths(self.hierarchy.root):
            entry: dict = {"path": path}
            if cg.procs or not sparse:
                entry["procs"] = sorted(cg.procs or ())
            if cg.populated or not sparse:
                entry["populated"] = cg.populated
            for controller in controllers:
                css = cg.css[controller.ssid]
                if css is not None:
                    entry[controller.name] = controller.report(css, sparse)
            cgroups.append(entry)
        holders: dict[tuple, list[int]] = {}
        for pid, ids in sorted(self.allocator.holdings().items()):
            for id_ in sorted(ids):
                allocation = self.allocator.allocation_of(id_)
                assert allocation is not None
                charged = tuple((controller.name, charge.cgroup.path) for controller, charge
                                in zip(self.allocator.controllers, allocation.charges))
                key = (pid, types.names[allocation.type], allocation.guest.name,
                       allocation.origin.path, charged)
                holders.setdefault(key, []).append(id_)
        return {"mountpoint": self.mountpoint, "tracking": self.tracker.mode,
                "limitations": self.limitations, "restarts": self.restarts,
                "capacities": dict(zip(types.names, types.capacity)),
                "capacity_source": self.capacity_source,
                "guests": self.allocator.kvm_log(),
                "controllers": [c.name for c in controllers],
                "resources": {c.name: c.resources() for c in controllers},
                "cgroups": sorted(cgroups, key=lambda c: c["path"]),
                "holders": [{"pid": pid, "type": t, "guest": guest, "cgroup": origin,
                             "charged": dict(charged), "ids": ids}
                            for (pid, t, guest, origin, charged), ids in holders.items()]}

    def _seen_by(self, peer: Peer, reply: dict) -> dict:
        """A status as the client's PID namespace sees it: its PIDs, 0 for those outside."""
        if not reply.get("ok") or not self.tracker.foreign(peer.pid):
            return reply
        cgroups = [{**entry, "procs": self.tracker.pids_for(peer.pid, entry["procs"])}
                   if "procs" in entry else entry for entry in reply["cgroups"]]
        pids = self.tracker.pids_for(peer.pid, [holder["pid"] for holder in reply["holders"]])
        holders = [{**holder, "pid": pid} for holder, pid in zip(reply["holders"], pids)]
        return {**reply, "cgroups": cgroups, "holders": holders}

    def _owner(self, peer: Peer) -> bool:
        """Root, or the user who mounted (the daemon runs as the mount's owner)."""
        return peer.uid in (0, self.owner_uid)

    def _check_may_act_for(self, peer: Peer, pid: int) -> None:
        """Allocating for a process and freeing what it holds: the mount's owner may, and
        whoever may signal it, as kill(2) decides (kill_ok_by_cred): the sender's UID is the
        target's real or saved UID, or the sender has CAP_KILL.  SO_PEERCRED tells the
        client's effective UID only, not its real one nor its capabilities: root stands for
        CAP_KILL, and a client whose real UID alone matches is refused."""
        if not self._owner(peer) and peer.uid not in self.tracker.owners(pid):
            raise fail(errno.EPERM, f"process {pid} belongs to another user")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
