"""Where processes are: `Membership`, what the engine asks of whatever keeps membership, and
`Procs`, the standalone tree's own books, as process tracking reports them (under --over, the
kernel's tree keeps membership: over/membership.py).

The books are each process outside the root with its cgroup (`members`) and each cgroup's own
processes (`Cgroup.procs`); a cgroup whose processes come or go flips `populated` up the tree,
as the kernel's cgroup_update_populated() does.  A process whose threads are in more than one
cgroup is in the `procs` of each (where each thread is, is threads.py's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .events import CGROUP_EVENTS_KEY, Commit, no_journal

if TYPE_CHECKING:
    from .cgroup import Cgroup, Hierarchy
    from .css import Controller, Css


class Membership(Protocol):
    """Where processes are: the one seam between the engine and what keeps membership, the
    standalone tree's `Procs` or, under --over, the kernel's own cgroup v2 tree."""

    def cgroup_of(self, pid: int) -> Cgroup:
        """The cgroup of a process (of its leader, if its threads are split)."""

    def thread_cgroup(self, tgid: int, tid: int) -> Cgroup:
        """The cgroup of thread `tid` of process `tgid` (/proc/TID/cgroup)."""

    def has_tasks(self, cg: Cgroup) -> bool:
        """Whether processes are in cg itself (cgroup_has_tasks())."""

    def type_of(self, cg: Cgroup) -> str:
        """What cg's cgroup.type reads (not asked of the hierarchy's root)."""

    def is_hierarchy_root(self, cg: Cgroup) -> bool:
        """Whether cg is the root of the kernel's hierarchy, exempt from the no-internal-process
        rule (the tree's root is, unless it is a cgroup below the kernel's root)."""


class Procs:
    """The standalone tree's membership: its processes, where each is, and their moves,
    forks and exits."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        # TGID -> cgroup, for processes outside the root (a split one: its leader's cgroup).
        self.members: dict[int, Cgroup] = {}

    # -- the Membership -------------------------------------------------------------------------

    def cgroup_of(self, pid: int) -> Cgroup:
        """The cgroup of a process (of its leader, if its threads are split)."""
        return self.members.get(pid, self.hierarchy.root)

    def thread_cgroup(self, tgid: int, tid: int) -> Cgroup:
        return self.hierarchy.threads.thread_cgroup(tgid, tid)

    def has_tasks(self, cg: Cgroup) -> bool:
        return bool(cg.procs)

    def type_of(self, cg: Cgroup) -> str:
        return self.hierarchy.type_of(cg)

    def is_hierarchy_root(self, cg: Cgroup) -> bool:
        return cg.parent is None

    # -- moves, forks and exits -----------------------------------------------------------------

    def attach(self, pid: int, dst: Cgroup, commit: Commit = no_journal) -> None:
        """Move a process, all its threads (cgroup.procs write); membership only, charges stay
        where they are."""
        h = self.hierarchy
        h.vet_destination(dst)
        sources = h.threads.cgroups_of(pid)
        if sources == {dst}:
            return
        moves = self._css_moves(self.cgroup_of(pid), dst)
        for controller, src_css, dst_css in moves:
            controller.can_attach(pid, src_css, dst_css)
        commit()
        with h.freezer.watch_frozen(*sources, dst):
            h.threads.split.pop(pid, None)
            # Join before leaving, as the kernel does, so that common ancestors stay populated.
            self.join(pid, dst)
            for src in sources - {dst}:
                self.leave(pid, src)
            self.set_home(pid, dst)
        for controller, src_css, dst_css in moves:
            controller.attach(pid, src_css, dst_css)

    def _css_moves(self, src: Cgroup, dst: Cgroup) -> list[tuple[Controller, Css, Css]]:
        """The controllers following processes whose css changes from src to dst, with both."""
        h = self.hierarchy
        moves = []
        for controller in h.following:
            src_css = h.effective_css(src, controller)
            dst_css = h.effective_css(dst, controller)
            if src_css is not dst_css:
                moves.append((controller, src_css, dst_css))
        return moves

    def fork(self, parent: int, child: int, creator: int | None = None) -> None:
        """A new process starts in the cgroup of the thread that forked it (`creator`, when it
        is known), or else of its parent's leader."""
        h = self.hierarchy
        cg = h.threads.thread_cgroup(parent, parent if creator is None else creator)
        if cg.parent is not None and child not in self.members:
            csses = [(c, h.effective_css(cg, c)) for c in h.following]
            for controller, css in csses:
                controller.can_fork(css)
            with h.freezer.watch_frozen(cg):
                self.members[child] = cg
                assert cg.procs is not None, "the parent is there already"
                cg.procs.add(child)
            for controller, css in csses:
                controller.fork(child, css)

    def exit(self, pid: int) -> None:
        """A process is gone; a PID not attached anywhere (the root's) is ignored."""
        h = self.hierarchy
        sources = h.threads.cgroups_of(pid)
        with h.freezer.watch_frozen(*sources):
            h.threads.split.pop(pid, None)
            home = self.members.pop(pid, None)
            for src in sources:
                self.leave(pid, src)
            h.freezer.stopped.discard(pid)
        if home is not None:
            for controller in h.following:
                controller.exit(pid, h.effective_css(home, controller))

    # -- what the books list --------------------------------------------------------------------

    def subtree_pids(self, cg: Cgroup) -> list[int]:
        """PIDs with a thread in cg or its live descendants (the root's implicit members
        excluded), each once."""
        return list(dict.fromkeys(pid for node in self.hierarchy.subtree(cg)
                                  for pid in node.procs or ()))

    def domain_pids(self, cg: Cgroup) -> list[int]:
        """What cg's cgroup.procs lists (of the processes attached below the root): for a
        thread root, every process of its threaded subtree."""
        stack, found = [cg], {}
        while stack:
            node = stack.pop()
            found.update(dict.fromkeys(node.procs or ()))
            if node.nr_threaded_children:
                stack.extend(child for child in node.children.values() if child.is_threaded)
        return sorted(found)

    # -- keeping the books (also for the thread placement) --------------------------------------

    def join(self, pid: int, cg: Cgroup) -> None:
        """pid has a thread in cg now."""
        if cg.parent is None:
            return  # the root's members are implicit
        if cg.procs is None:
            cg.procs = set()
        if pid not in cg.procs:
            cg.procs.add(pid)
            if len(cg.procs) == 1:
                self._populated_changed(cg, True)

    def leave(self, pid: int, cg: Cgroup) -> None:
        """pid has no thread in cg any more."""
        if cg.parent is None or not cg.procs or pid not in cg.procs:
            return
        cg.procs.discard(pid)
        if not cg.procs:
            cg.procs = None
            self._populated_changed(cg, False)

    def set_home(self, pid: int, cg: Cgroup) -> None:
        """Where the process is (a split one: its leader, or a thread if the leader is gone);
        an unsplit process at the root is not listed."""
        if cg.parent is None and pid not in self.hierarchy.threads.split:
            self.members.pop(pid, None)
        else:
            self.members[pid] = cg

    def _populated_changed(self, cg: Cgroup, populated: bool) -> None:
        """cg's own process set became non-empty (or empty): propagate populated flips upwards."""
        if cg.nr_populated_children:
            return  # populated through its children all along
        events = self.hierarchy.events
        node = cg
        step = 1 if populated else -1
        while True:
            events.append((CGROUP_EVENTS_KEY, node))
            parent = node.parent
            if parent is None:
                return
            was = parent.populated
            parent.nr_populated_children += step
            if not node.is_threaded:
                parent.nr_populated_domain_children += step
            if parent.populated == was:
                return
            node = parent
