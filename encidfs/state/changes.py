"""Every durable change, by name: the one way the state changes, live or replayed.

A change a request makes is `run`: it is written to the journal once its checks have passed and
before it changes anything (the engine's commit points), so that a change the journal cannot
take is refused and never applied.  What happened without anyone asking (a fork, an exit, a
refused charge that counted an event) is a `fact`: applied at once, journalled as it can be.
On restart the journal's records are replayed through the same methods, in order, so that the
state comes back exactly as it was.  A record is the method's name and its arguments: cgroups by
id, names and bytes as text, nothing that needs /proc.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import outcome

from ..engine import Controller, Engine, Refused
from ..engine.cgroup import Cgroup
from ..engine.events import Commit, no_journal
from ..files.kernfs import Kernfs
from .operations import Op

log = logging.getLogger(__name__)

Record = tuple  # (an Op's value, *arguments)
T = TypeVar("T", bound=Callable[..., object])


class Journal(Protocol):
    def append(self, record: Record) -> None:
        """Make the record durable now, with the facts before it; OSError if it cannot be."""

    def append_all(self, records: list[Record]) -> None:
        """Make the records durable now, in one commit, with the facts before them."""

    def stage(self, record: Record) -> None:
        """Keep a fact, to be made durable with the next record (or the next flush)."""


def applies(op: Op) -> Callable[[T], T]:
    """Mark the method of Changes that applies `op`, live and replayed."""
    def mark(method: T) -> T:
        method.applies = op  # type: ignore[attr-defined]
        return method
    return mark


class Changes:
    APPLY: dict[Op, Callable[..., object]]  # set below, once the class is made

    def __init__(self, engine: Engine, kernfs: Kernfs, journal: Journal | None = None) -> None:
        """Changes to `engine` and to `kernfs`'s node attributes, made durable in `journal`
        (none: changes are not kept).  Replays and restores apply without journalling."""
        self.engine = engine
        self.hierarchy = engine.hierarchy
        self.allocator = engine.allocator
        self.kernfs = kernfs
        self.journal = journal
        # When each member and holder started (ticks since boot): a restore drops the ones
        # whose PID has another process by then.
        self.starts: dict[int, int] = {}

    def run(self, op: Op, *args: object) -> object:
        record = (op.value, *args)
        journal = self.journal
        commit = no_journal if journal is None else (lambda: journal.append(record))
        try:
            return self.APPLY[op](self, *args, commit=commit)
        except Refused:
            self._stage(record)  # it left a trace: replayed, it refuses and leaves it again
            raise

    def run_all(self, records: list[Record]) -> list[outcome.Outcome]:
        """Journal changes checked already in one commit, then apply them in that order; what
        each returned or raised.  A journal that cannot take them refuses them all, and none
        is applied.  One refused when applied (an earlier one took what it needed) is refused
        again on replay."""
        if records and self.journal is not None:
            try:
                self.journal.append_all(records)
            except OSError as error:
                return [outcome.Error(error) for _ in records]
        return [outcome.capture(self.APPLY[Op(name)], self, *args) for name, *args in records]

    def fact(self, op: Op, *args: object) -> None:
        self.APPLY[op](self, *args)
        self._stage((op.value, *args))

    def replay(self, records: Iterable[Record]) -> int:
        """Apply records read back from a journal; return how many could not be (logged)."""
        failed = 0
        for record in records:
            try:
                if record[0] not in _NAMES:
                    raise ValueError(f"unknown change {record[0]!r}")
                self.APPLY[Op(record[0])](self, *record[1:])
            except Refused:
                pass  # refused then too
            except (OSError, LookupError, TypeError, ValueError) as error:
                failed += 1
                log.warning("journal record %.200r could not be replayed: %s", record, error)
        return failed

    def _stage(self, record: Record) -> None:
        if self.journal is not None:
            self.journal.stage(record)

    def _cgroup(self, cgid: int) -> Cgroup:
        return self.hierarchy.by_id[cgid]

    # -- the tree and its settings --------------------------------------------------------------

    @applies(Op.MKDIR)
    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int,
              at: int | None = None, commit: Commit = no_journal) -> Cgroup:
        """`at`: when, on the engine's clock (a freezing parent's time counts from then)."""
        return self.kernfs.apply_mkdir(self._cgroup(parent), name, mode, uid, gid, commit, at)

    @applies(Op.RMDIR)
    def rmdir(self, cgroup: int, commit: Commit = no_journal) -> None:
        self.hierarchy.rmdir(self._cgroup(cgroup), commit)

    @applies(Op.APPEARED)
    def appeared(self, parent: int, name: str, cgroup: int) -> None:
        """A cgroup the kernel has made (--over), by its cgroup ID."""
        self.hierarchy.mirror(self._cgroup(parent), name, cgroup)

    @applies(Op.VANISHED)
    def vanished(self, cgroup: int) -> None:
        """A cgroup the kernel has removed (--over), and what the mirror had below it."""
        h = self.hierarchy
        for cg in reversed(list(h.subtree(self._cgroup(cgroup)))):
            h.rmdir(cg)

    @applies(Op.SUBTREE_CONTROL)
    def subtree_control(self, cgroup: int, enable: list[str], disable: list[str], uid: int,
                        gid: int, commit: Commit = no_journal) -> None:
        cg, h = self._cgroup(cgroup), self.hierarchy
        enable_mask, disable_mask = self.vet_subtree_control(cgroup, enable, disable)
        h.write_subtree_control(cg, enable_mask, disable_mask, commit)
        self.kernfs.controller_files_made(cg, uid, gid)

    def vet_subtree_control(self, cgroup: int, enable: list[str],
                            disable: list[str]) -> tuple[int, int]:
        """The checks of a subtree_control change, as masks; nothing is changed."""
        cg, h = self._cgroup(cgroup), self.hierarchy
        enable_mask, disable_mask = (sum(1 << c.ssid for c in h.controllers if c.name in names)
                                     for names in (enable, disable))
        # The kernel meets a name taken by a directory only when it makes the files.
        self.kernfs.check_file_collisions(cg, h.vet_subtree_control(cg, enable_mask,
                                                                   disable_mask)[0])
        return enable_mask, disable_mask

    @applies(Op.THREADED)
    def threaded(self, cgroup: int, commit: Commit = no_journal) -> None:
        """"threaded" written to cgroup.type."""
        self.hierarchy.enable_threaded(self._cgroup(cgroup), commit)

    @applies(Op.SET)
    def set(self, cgroup: int, key: str, value: int, at: int | None = None,
            commit: Commit = no_journal) -> None:
        """cgroup.max.depth, cgroup.max.descendants, cgroup.freeze (`at`: when, on the
        engine's clock, which the freezing time counts from)."""
        cg, h = self._cgroup(cgroup), self.hierarchy
        if key == "freeze":
            h.freezer.set_freeze(cg, bool(value), commit, at)
            return
        setter = {"max_depth": h.set_max_depth, "max_descendants": h.set_max_descendants}
        setter[key](cg, value, commit)

    @applies(Op.CONTROLLER_SETTING)
    def controller_setting(self, cgroup: int, controller: str, key: str, value: int,
                           commit: Commit = no_journal) -> None:
        """A controller's setting, which it applies itself: encids.<type>.max and misc.max
        (`key`: the type), or whatever another controller takes."""
        self.controller(controller).apply_setting(self._cgroup(cgroup), key, value, commit)

    # -- node attributes ------------------------------------------------------------------------

    @applies(Op.SETATTR)
    def setattr(self, cgroup: int, file: str, mode: int | None, uid: int | None,
                gid: int | None, commit: Commit = no_journal) -> None:
        self.kernfs.apply_setattr(self._cgroup(cgroup), file, mode, uid, gid, commit)

    @applies(Op.SETXATTR)
    def setxattr(self, cgroup: int, file: str, name: str, value: str, uid: int | None = None,
                 commit: Commit = no_journal) -> None:
        """`uid`: who sets it (None in a record written before xattrs were charged)."""
        self.kernfs.apply_setxattr(self._cgroup(cgroup), file, name, value, uid, commit)

    @applies(Op.REMOVEXATTR)
    def removexattr(self, cgroup: int, file: str, name: str,
                    commit: Commit = no_journal) -> None:
        self.kernfs.apply_removexattr(self._cgroup(cgroup), file, name, commit)

    # -- processes and IDs ----------------------------------------------------------------------

    @applies(Op.ATTACH)
    def attach(self, pid: int, start: int, cgroup: int, commit: Commit = no_journal) -> None:
        cg = self._cgroup(cgroup)
        self.hierarchy.procs.attach(pid, cg, commit)
        self._started(pid, start)

    @applies(Op.ATTACH_THREAD)
    def attach_thread(self, pid: int, start: int, tid: int, cgroup: int, threads: list[int],
                      commit: Commit = no_journal) -> None:
        """A cgroup.threads write; `threads` are the process's threads then."""
        self.hierarchy.threads.attach_thread(pid, tid, self._cgroup(cgroup), threads, commit)
        self._started(pid, start)

    @applies(Op.ALLOCATE)
    def allocate(self, holder: int, start: int, type_name: str, count: int,
                 cgroup: int | None = None, guest: str | None = None,
                 commit: Commit = no_journal) -> list[int]:
        """Charged to `cgroup`, the holder's when it asked (a journal of an older release
        has none: the holder's cgroup as replayed), for `guest`, whose range the IDs come
        from (an older release's has none: the type's own guest)."""
        origin = None if cgroup is None else self._cgroup(cgroup)
        ids = self.allocator.allocate(holder, type_name, count, commit, origin, guest)
        self._started(holder, start)
        return ids

    @applies(Op.FREE)
    def free(self, ids: list[int], commit: Commit = no_journal) -> None:
        holders = {self.allocator.holder_of(id_) for id_ in ids}
        self.allocator.free(ids, commit)
        for holder in holders:
            self._started(holder, None)

    @applies(Op.FORK)
    def fork(self, parent: int, child: int, start: int, creator: int | None = None) -> None:
        self.hierarchy.procs.fork(parent, child, creator)
        self._started(child, start)

    @applies(Op.THREADS)
    def threads(self, pid: int, threads: list[int]) -> None:
        """The threads of a process whose threads are in more than one cgroup changed."""
        self.hierarchy.threads.set_threads(pid, threads)

    @applies(Op.EXIT)
    def exit(self, pid: int) -> None:
        self.hierarchy.procs.exit(pid)
        self.allocator.release_holder(pid)  # like a VM's fd closing with it
        self.starts.pop(pid, None)

    def _started(self, pid: int | None, start: int | None) -> None:
        """Keep the start time of a member or holder; forget a PID that is neither."""
        if pid is None:
            return
        if pid in self.hierarchy.procs.members or pid in self.allocator.holdings():
            if start is not None:
                self.starts[pid] = start
        else:
            self.starts.pop(pid, None)

    def controller(self, name: str) -> Controller:
        controller = self.hierarchy.controller(name)
        if controller is None:
            raise LookupError(f"no controller {name!r}")
        return controller


Changes.APPLY = {method.applies: method for method in vars(Changes).values()
                 if hasattr(method, "applies")}
if set(Changes.APPLY) != set(Op):
    raise TypeError(f"no method of Changes applies {sorted(set(Op) - set(Changes.APPLY))}")
_NAMES = frozenset(op.value for op in Op)
