"""Membership under --over: the kernel's own.

Where a process is, is what /proc/PID/cgroup says at the moment it is asked (as KVM charges the
current task's cgroup); whether a cgroup has processes and what type it is, what its
cgroup.procs and cgroup.type say.  Nothing per process is followed but the holders of IDs,
each by a pidfd, so that what they hold is freed when they exit.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..engine import Cgroup
from ..procs.watcher import ProcessWatcher, logged
from .tree import KernelTree, proc_cgroup


class KernelMembership(ProcessWatcher):
    """Holders followed to their exit, and the kernel's tree to its changes; no forks, no
    freezer, no /proc scans."""

    def __init__(self, tree: KernelTree, on_exit: Callable[[int], None], pidfd_budget: int,
                 on_settled: Callable[[], None]) -> None:
        super().__init__(on_exit, pidfd_budget=pidfd_budget, on_settled=on_settled)
        self.tree = tree
        self.mode = f"the kernel's cgroup v2 tree at {tree.top}"

    def _start(self, nursery: trio.Nursery) -> None:
        super()._start(nursery)
        nursery.start_soon(self._follow_tree)

    async def _follow_tree(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.tree.fileno())
            logged(self.settle)

    def settle(self) -> None:
        """The tree's changes and the holders' exits, told until now."""
        if self.tree.drain():
            self._news = True
        super().settle()

    # -- the engine's membership ------------------------------------------------------------

    def cgroup_of(self, pid: int) -> Cgroup:
        """A process gone meanwhile is at the root (its watch tells its exit next)."""
        return self.tree.cgroup_at(proc_cgroup(pid))

    def thread_cgroup(self, tgid: int, tid: int) -> Cgroup:
        return self.tree.cgroup_at(proc_cgroup(tid))

    def has_tasks(self, cg: Cgroup) -> bool:
        return bool(self.tree.read(cg, "cgroup.procs").strip())

    def type_of(self, cg: Cgroup) -> str:
        return self.tree.read(cg, "cgroup.type").strip()

    def is_hierarchy_root(self, cg: Cgroup) -> bool:
        return cg.is_root and self.tree.is_hierarchy_root
