"""The freezer (the kernel's kernel/cgroup/freezer.c): cgroup.freeze, what it makes frozen, and
the time spent freezing (cgroup.stat.local's frozen_usec).  The processes are stopped and
resumed by the tracker (procs/freezer.py), which reports each one that has stopped; a cgroup is
frozen when it is freezing and every process of its subtree has stopped, and each flip of that
notifies the cgroup's cgroup.events.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .events import CGROUP_EVENTS_KEY, Commit, no_journal

if TYPE_CHECKING:
    from .cgroup import Cgroup, Hierarchy


class _FrozenFlips:
    """The context of a change: once it is made, cgroup.events notices for the cgroups above
    the given ones whose frozen state it flipped.  (A class, not a generator: every move
    enters one.)"""

    __slots__ = ("_freezer", "_before")

    def __init__(self, freezer: Freezer, cgroups: Iterable[Cgroup]) -> None:
        self._freezer = freezer
        chains = {node for cg in cgroups if freezer.effective_freeze(cg)
                  for node in cg.ancestors()}
        self._before = {node: freezer.frozen(node) for node in chains}

    def __enter__(self) -> None:
        return None

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is None and self._before:
            freezer = self._freezer
            freezer.hierarchy.events.extend((CGROUP_EVENTS_KEY, node)
                                            for node, was in self._before.items()
                                            if freezer.frozen(node) != was)


class Freezer:
    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.stopped: set[int] = set()  # PIDs the freezer has stopped, as the tracker reports

    def set_freeze(self, cg: Cgroup, freeze: bool, commit: Commit = no_journal,
                   at: int | None = None) -> None:
        """`at`: when (the clock's time), for a change replayed from a journal."""
        self.hierarchy._check_live(cg)
        if cg.freeze == freeze:
            return
        commit()
        before = {node: self.frozen(node) for node in self.hierarchy.subtree(cg)}
        applied = cg.parent is None or not self.effective_freeze(cg.parent)
        cg.freeze = freeze
        self._account_freezing(cg, self.hierarchy.clock() if at is None else at)
        self.hierarchy.events.extend((CGROUP_EVENTS_KEY, node) for node, was in before.items()
                            if self.frozen(node) != was)
        if not applied:
            # cgroup_freeze(): an ancestor decides, so nothing changes; the writer is told
            # there is nothing to wait for.
            self.hierarchy.events.append((CGROUP_EVENTS_KEY, cg))

    def _account_freezing(self, cg: Cgroup, now: int) -> None:
        """Start or end the freezing time of every cgroup of the subtree whose effective
        freeze changed (the kernel's freeze_start_nsec and frozen_nsec)."""
        stack = [(cg, cg.parent is not None and self.effective_freeze(cg.parent))]
        while stack:
            node, above = stack.pop()
            freezing = node.freeze or above
            if freezing and node.freeze_since is None:
                node.freeze_since = now
            elif not freezing and node.freeze_since is not None:
                node.frozen_ns += max(0, now - node.freeze_since)
                node.freeze_since = None
            stack.extend((child, freezing) for child in node.children.values())

    def restart_freezing_clock(self) -> None:
        """The times kept are another boot's clock: the freezing under way counts from now."""
        now = self.hierarchy.clock()
        for cg in self.hierarchy.subtree(self.hierarchy.root):
            if cg.freeze_since is not None:
                cg.freeze_since = now

    def frozen_usec(self, cg: Cgroup) -> int:
        """cgroup.stat.local's frozen_usec: the time spent freezing, whether frozen or not."""
        total = cg.frozen_ns
        if cg.freeze_since is not None:
            total += max(0, self.hierarchy.clock() - cg.freeze_since)
        return total // 1000

    def effective_freeze(self, cg: Cgroup) -> bool:
        node: Cgroup | None = cg
        while node is not None:  # a loop, not ancestors(): every move asks, three times
            if node.freeze:
                return True
            node = node.parent
        return False

    def freezing(self, pid: int) -> bool:
        """Whether the freezer covers a process: any cgroup with a thread of it (SIGSTOP
        stops a whole process)."""
        return any(self.effective_freeze(cg) for cg in self.hierarchy.threads.cgroups_of(pid))

    def frozen(self, cg: Cgroup) -> bool:
        """Frozen: freezing applies and every process of the subtree has stopped."""
        return self.effective_freeze(cg) and all(
            pid in self.stopped for pid in self.hierarchy.procs.subtree_pids(cg))

    def set_stopped(self, pid: int, stopped: bool) -> None:
        with self.watch_frozen(*self.hierarchy.threads.cgroups_of(pid)):
            if stopped:
                self.stopped.add(pid)
            else:
                self.stopped.discard(pid)

    def watch_frozen(self, *cgroups: Cgroup) -> _FrozenFlips:
        """Notify cgroup.events of the cgroups above these whose frozen state the change flips."""
        return _FrozenFlips(self, cgroups)
