"""The cgroup v2 core files (cgroup.*), as the kernel's cgroup_base_files table defines them."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import Protocol

from ..engine import CGROUP_EVENTS_KEY, INT_MAX, Cgroup, Hierarchy, fail
from ..state.operations import Op
from .cftype import Caller, CfType, Changes, Placement
from .parse import kstrtoint, limit_text, strstrip


class Settles(Protocol):
    """What every file needs from process tracking: Kernfs asks nothing more of it."""

    def settle(self) -> None:
        """Bring the engine up to date with the exits that have happened."""


class Processes(Settles, Protocol):
    """What the core files need from process tracking."""

    def thread_group(self, pid: int) -> int:
        """The TGID of a PID or TID; ESRCH if there is none, EINVAL if it cannot be moved."""

    def all_pids(self) -> list[int]: ...

    def threads(self, pid: int) -> list[int]: ...

    def sync(self) -> None:
        """Bring the engine up to date with the forks and exits that have happened."""

    def joined(self, pid: int) -> None:
        """pid now belongs to a cgroup other than the root: follow its forks and its exit."""

    def watch(self, pid: int) -> int | None:
        """Follow pid's exit, settling first the exit of the one it was; when it started if it
        lives, else None."""

    def pid_from(self, caller: int, pid: int, thread: bool = False) -> int:
        """The PID (TID) that process `caller` names `pid`, in the daemon's PID namespace;
        ESRCH if the caller can see no such process."""

    def pids_for(self, caller: int, pids: list[int]) -> list[int]:
        """PIDs (TIDs) as process `caller` sees them: 0 for one outside its namespace."""

    def check_signalable(self, pid: int) -> None:
        """EPERM for a process the daemon may not signal (a user's daemon, another's process)."""

    def kill(self, pids: Iterable[int]) -> None: ...

    def apply_freezer(self, pids: Iterable[int]) -> None:
        """Stop the processes freezing covers, resume the ones it no longer does."""


def _mask_line(names: list[str]) -> str:
    return " ".join(names) + "\n" if names else ""


def _shown_limit(value: int) -> str:
    return limit_text(value, INT_MAX) + "\n"


def _parse_limit(text: bytes) -> int:
    text = strstrip(text)
    if text == b"max":
        return INT_MAX
    value = kstrtoint(text, 0)
    if value < 0:
        raise fail(errno.ERANGE)
    return value


def _parse_pid(text: bytes) -> int:
    try:
        pid = kstrtoint(strstrip(text), 0)
    except OSError:
        pid = -1
    if pid < 0:
        raise fail(errno.EINVAL, "not a PID")
    return pid


def _parse_switch(text: bytes, allowed: range) -> int:
    value = kstrtoint(strstrip(text), 0)
    if value not in allowed:
        raise fail(errno.ERANGE)
    return value


def core_files(hierarchy: Hierarchy, processes: Processes,
               may_write: Callable[[Cgroup, str, Caller], bool]) -> list[CfType]:
    """`may_write(cg, file name, caller)` tells whether the caller may write that file."""

    def check_migration(src: Cgroup, dst: Cgroup, caller: Caller) -> None:
        """cgroup_procs_write_permission(): the opener must be able to write cgroup.procs of
        the common ancestor of source and destination (the delegation boundary)."""
        above_dst = set(dst.ancestors())
        common = next(cg for cg in src.ancestors() if cg in above_dst)  # the root at the latest
        if not may_write(common, "cgroup.procs", caller):
            raise fail(errno.EACCES, f"no write access to {common.path}/cgroup.procs")

    def root_pids() -> list[int]:
        """The processes the root has implicitly: every one not attached elsewhere."""
        return [pid for pid in processes.all_pids() if pid not in hierarchy.procs.members]

    def show_procs(cg: Cgroup, reader: Caller) -> str:
        # All processes of a threaded subtree belong to its thread root (cgroup_procs_start()).
        if cg.is_threaded:
            raise fail(errno.EOPNOTSUPP, "cgroup.procs of a threaded cgroup")
        processes.sync()
        pids = hierarchy.procs.domain_pids(cg)
        if cg.is_root:
            pids = sorted(set(root_pids()).union(pids))
        return "".join(f"{pid}\n" for pid in processes.pids_for(reader.pid, pids))

    def write_procs(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        pid = _parse_pid(text)
        pid = processes.pid_from(caller.pid, pid) if pid else caller.pid
        processes.sync()
        tgid = processes.thread_group(pid)
        processes.check_signalable(tgid)
        # The process the engine knows by this PID may have exited since (its PID reused):
        # its exit comes first.  One that is exiting itself moves nowhere, as in the kernel.
        start = processes.watch(tgid)
        if start is None:
            return
        check_migration(hierarchy.procs.cgroup_of(tgid), cg, caller)
        changes.run(Op.ATTACH, tgid, start, cg.id)
        if not cg.is_root:
            processes.joined(tgid)
        processes.apply_freezer([tgid])

    def show_threads(cg: Cgroup, reader: Caller) -> str:
        processes.sync()
        if cg.is_root:
            pids = root_pids() + [pid for pid in hierarchy.threads.split
                                  if pid in hierarchy.procs.members]
        else:
            pids = sorted(cg.procs or ())
        tids = []
        for pid in pids:
            placed = hierarchy.threads.threads_in(cg, pid)
            tids += processes.threads(pid) if placed is None else placed
        return "".join(f"{tid}\n" for tid in processes.pids_for(reader.pid, sorted(tids)))

    def write_threads(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        tid = _parse_pid(text)
        tid = processes.pid_from(caller.pid, tid, thread=True) if tid else caller.pid
        processes.sync()
        tgid = processes.thread_group(tid)
        processes.check_signalable(tgid)
        start = processes.watch(tgid)
        if start is None:
            return
        check_migration(hierarchy.threads.thread_cgroup(tgid, tid), cg, caller)
        changes.run(Op.ATTACH_THREAD, tgid, start, tid, cg.id,
                    processes.threads(tgid))
        if tgid in hierarchy.procs.members:
            processes.joined(tgid)
        processes.apply_freezer([tgid])

    def write_subtree_control(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        enable = disable = 0
        for token in strstrip(text).split(b" "):
            if not token:
                continue
            controller = hierarchy.controller(token[1:].decode("latin-1"))
            if token[:1] not in (b"+", b"-") or controller is None:
                raise fail(errno.EINVAL, f"bad token {token!r}")
            bit = 1 << controller.ssid
            if token[:1] == b"+":
                enable, disable = enable | bit, disable & ~bit
            else:
                enable, disable = enable & ~bit, disable | bit
        changes.run(Op.SUBTREE_CONTROL, cg.id, hierarchy.names(enable), hierarchy.names(disable),
                    caller.uid, caller.gid)

    def show_stat(cg: Cgroup) -> str:
        lines = [f"nr_descendants {cg.nr_descendants}\n"]
        for controller in hierarchy.controllers:
            css = cg.css[controller.ssid]
            lines.append(f"nr_subsys_{controller.name} {css.nr_descendants + 1 if css else 0}\n")
        lines.append(f"nr_dying_descendants {cg.nr_dying_descendants}\n")
        for controller in hierarchy.controllers:
            lines.append(f"nr_dying_subsys_{controller.name} "
                         f"{cg.nr_dying_subsys[controller.ssid]}\n")
        return "".join(lines)

    def show_events(cg: Cgroup) -> str:
        processes.sync()
        return f"populated {int(cg.populated)}\nfrozen {int(hierarchy.freezer.frozen(cg))}\n"

    def write_type(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        # Only a domain can turn threaded; nothing turns back.
        if strstrip(text) != b"threaded":
            raise fail(errno.EINVAL, "only \"threaded\" can be written")
        changes.run(Op.THREADED, cg.id)

    def write_freeze(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        changes.run(Op.SET, cg.id, "freeze", _parse_switch(text, range(2)), hierarchy.clock())
        processes.sync()
        processes.apply_freezer(hierarchy.procs.subtree_pids(cg))

    def write_kill(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        _parse_switch(text, range(1, 2))
        # Killing takes whole processes, which a threaded cgroup does not hold.
        if cg.is_threaded:
            raise fail(errno.EOPNOTSUPP, "cgroup.kill of a threaded cgroup")
        processes.sync()
        processes.kill(hierarchy.procs.subtree_pids(cg))

    def write_max_descendants(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        changes.run(Op.SET, cg.id, "max_descendants", _parse_limit(text))

    def write_max_depth(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        changes.run(Op.SET, cg.id, "max_depth", _parse_limit(text))

    not_on_root = Placement.NOT_ON_ROOT
    return [
        CfType("cgroup.type", lambda cg: f"{hierarchy.type_of(cg)}\n", write_type, not_on_root),
        CfType("cgroup.procs", show_procs, write_procs, records=True, to_reader=True),
        CfType("cgroup.threads", show_threads, write_threads, records=True, to_reader=True),
        CfType("cgroup.controllers",
               lambda cg: _mask_line(hierarchy.names(hierarchy.controllers_of(cg)))),
        CfType("cgroup.subtree_control",
               lambda cg: _mask_line(hierarchy.names(cg.subtree_control)), write_subtree_control),
        CfType("cgroup.events", show_events, placement=not_on_root, notify=CGROUP_EVENTS_KEY),
        CfType("cgroup.max.descendants", lambda cg: _shown_limit(cg.max_descendants),
               write_max_descendants),
        CfType("cgroup.max.depth", lambda cg: _shown_limit(cg.max_depth), write_max_depth),
        CfType("cgroup.stat", show_stat),
        CfType("cgroup.stat.local", lambda cg: f"frozen_usec {hierarchy.freezer.frozen_usec(cg)}\n",
               placement=not_on_root),
        CfType("cgroup.freeze", lambda cg: f"{int(cg.freeze)}\n", write_freeze, not_on_root),
        CfType("cgroup.kill", None, write_kill, not_on_root),
    ]
