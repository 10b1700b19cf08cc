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
from ..procs import ProcessTracker
from ..procs.tracker import _logged
from .tree import KernelTree, proc_cgroup


def _no_fork(parent: int, child: int, start: int | None, creator: int | None) -> None:
    raise AssertionError("forks are the kernel's to place")


class KernelMembership(ProcessTracker):
    """The process tracker's holder watching (pidfds, PID namespaces), without forks, a
    freezer or /proc scans: the tree is the kernel's."""

    def __init__(self, tree: KernelTree, on_exit: Callable[[int], None],
                 exempt: frozenset[int], pidfd_budget: int,
                 on_settled: Callable[[], None]) -> None:
        super().__init__({}, _no_fork, on_exit, lambda pid: False, lambda pid, stopped: None,
                         use_connector=False, exempt=exempt, pidfd_budget=pidfd_budget,
                         on_settled=on_settled)
        self.tree = tree
        self.mode = f"the kernel's cgroup v2 tree at {tree.top}"
        self.limitations = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_exits)
            nursery.start_soon(self._poll)
            nursery.start_soon(self._follow_tree)
            task_status.started()

    async def _follow_tree(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.tree.fileno())
            _logged(self.settle)

    def settle(self) -> None:
        """The tree's changes and the holders' exits, told until now."""
        if self.tree.drain():
            self._news = True
        super().settle()

    def sync(self) -> None:
        self.settle()

    # -- the engine's membership ------------------------------------------------------------

    def cgroup_of(self, pid: int) -> Cgroup:
        """A process gone meanwhile is at the root (its watch tells its exit next)."""
        return self.tree.cgroup_at(proc_cgroup(pid))

    def has_tasks(self, cg: Cgroup) -> bool:
        return bool(self.tree.read(cg, "cgroup.procs").strip())

    def type_of(self, cg: Cgroup) -> str:
        return self.tree.read(cg, "cgroup.type").strip()

    def is_hierarchy_root(self, cg: Cgroup) -> bool:
        return cg.is_root and self.tree.is_hierarchy_root
