"""Thread placement in the standalone tree (cgroup.threads): a process's threads are where the
process is, except in a threaded subtree, where cgroup.threads places them one by one.  Only a
process whose threads are in more than one cgroup ("split") has its threads listed here, with
the cgroup of each; its TGID is in the `procs` of every cgroup that has one of them, and the
process is where its leader is.  Which cgroups may hold threads is the tree's (cgroup.type,
cgroup.py); the books of processes are membership.py's.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .errors import fail
from .events import Commit, no_journal

if TYPE_CHECKING:
    from .cgroup import Cgroup, Hierarchy


class Threads:
    """The threads of the split processes, and the moves that split processes or join their
    threads again."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.split: dict[int, dict[int, Cgroup]] = {}  # TGID -> TID -> cgroup, when split

    def thread_cgroup(self, tgid: int, tid: int) -> Cgroup:
        threads = self.split.get(tgid)
        if threads is not None and tid in threads:
            return threads[tid]
        return self.hierarchy.procs.cgroup_of(tgid)

    def cgroups_of(self, pid: int) -> set[Cgroup]:
        """Every cgroup that has a thread of the process."""
        threads = self.split.get(pid)
        if threads is None:
            return {self.hierarchy.procs.cgroup_of(pid)}
        return set(threads.values())

    def threads_in(self, cg: Cgroup, pid: int) -> list[int] | None:
        """The TIDs of a split process that are in cg; None for a process not split (all its
        threads are where it is)."""
        threads = self.split.get(pid)
        if threads is None:
            return None
        return sorted(tid for tid, where in threads.items() if where is cg)

    def attach_thread(self, pid: int, tid: int, dst: Cgroup, threads: list[int],
                      commit: Commit = no_journal) -> None:
        """Move one thread of process `pid` (cgroup.threads write) within its threaded
        subtree; `threads` are the process's live TIDs (needed when it splits)."""
        h = self.hierarchy
        h.vet_destination(dst)
        src = self.thread_cgroup(pid, tid)
        if src.dom is not dst.dom:
            raise fail(errno.EOPNOTSUPP, "threads move only within their threaded subtree")
        if src is dst:
            return
        commit()
        placed = self.split.get(pid)
        if placed is None:
            placed = dict.fromkeys(threads, src)
        placed[tid] = dst
        with h.freezer.watch_frozen(src, dst):
            h.procs.join(pid, dst)
            self._place(pid, placed)
            if src not in placed.values():
                h.procs.leave(pid, src)

    def set_threads(self, pid: int, threads: list[int]) -> None:
        """The live threads of a split process, as /proc lists them (the tracker's view after
        threads came and went): new ones join the leader's cgroup (the thread that made one is
        not known), gone ones leave."""
        placed = self.split.get(pid)
        if placed is None:
            return
        procs = self.hierarchy.procs
        home = procs.cgroup_of(pid)
        updated = {tid: placed.get(tid, home) for tid in threads}
        if not updated:
            return  # the process is exiting: its exit settles everything
        before, after = set(placed.values()), set(updated.values())
        with self.hierarchy.freezer.watch_frozen(*before):
            for cg in after - before:
                procs.join(pid, cg)
            self._place(pid, updated)
            for cg in before - after:
                procs.leave(pid, cg)

    def _place(self, pid: int, placed: dict[int, Cgroup]) -> None:
        """Keep the threads' cgroups of a process while they are in more than one; the
        process is where its leader is (or, the leader gone, one of its threads)."""
        procs = self.hierarchy.procs
        where = set(placed.values())
        if len(where) > 1:
            self.split[pid] = placed
            home = placed.get(pid)
            if home is None:
                home = procs.cgroup_of(pid)
                if home not in where:
                    home = min(where, key=lambda cg: cg.id)  # the same on every replay
        else:
            self.split.pop(pid, None)
            (home,) = where
        procs.set_home(pid, home)
