"""Process tracking, the standalone tree's membership: what the kernel knows about processes,
turned into engine calls.

Processes are read from /proc of the daemon's PID namespace.  Every process the engine cares
about (a member of a cgroup other than the root, or a holder of IDs) is followed to its exit
(watcher.py).  The kernel takes a task out of its cgroup in do_exit, before its parent can reap
it, so `settle()` applies the exits that have happened before anything that shows membership or
holdings is answered.

A process forked by a member joins its parent's cgroup.  With the privilege for it, fork events
come from the kernel's process events connector, asked for only while some process is followed;
without it, /proc is scanned for children of members (by parent PID: started after the parent
joined, and not among its children then).  Either way `sync()` brings the engine up to date
before anything that depends on membership is answered.  An exit is applied only once the
connector's queue has been read past the moment it was seen, so a child forked just before its
parent exited still joins the parent's cgroup; a child found exited as it is adopted is queued
like any other exit.  Nothing here calls back into itself: events are applied one by one, in
order, and a failure costs its event alone.  Where the connector's queue overflowed (ENOBUFS),
/proc is scanned as without it (README: what tracking cannot know).

Threads matter only for a process whose threads are in more than one cgroup ("split"): the
connector reports its new threads and exits as they happen; without it, /proc/PID/task is read
on every sync() and every POLL_INTERVAL.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping

import trio

from ..engine import fail
from .connector import Connector, Fork, Thread
from .freezer import Freezer
from .procfs import alive, read_stat
from .watcher import ProcessWatcher, each, logged

log = logging.getLogger(__name__)

# Seconds at least between two wake-ups for forks: a wake-up costs the daemon some 100-300 us
# of CPU whatever it does, a fork event 2 us.
FORK_INTERVAL = 0.05
SETTLE_ROUNDS = 16  # connector drains a settle() makes for children found exited on adoption
LOST_LOG_INTERVAL = 5.0  # seconds: lost events are logged at most this often
_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_ticks() -> int:
    """Now, in the unit of /proc/PID/stat start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


class ProcessTracker(ProcessWatcher):
    """Membership of the standalone tree: members followed to their forks as well as their
    exits, their threads where they are split, and the freezer."""

    def __init__(self, members: Mapping[int, object],
                 on_fork: Callable[[int, int, int | None, int | None], None],
                 on_exit: Callable[[int], None], frozen: Callable[[int], bool],
                 on_stopped: Callable[[int, bool], None], proc: str = "/proc",
                 use_connector: bool = True, exempt: frozenset[int] = frozenset(),
                 pidfd_budget: int = 1 << 30, split: Mapping[int, Mapping[int, object]] = {},
                 on_threads: Callable[[int, list[int]], None] = lambda pid, tids: None,
                 on_settled: Callable[[], None] = lambda: None) -> None:
        super().__init__(on_exit, proc, pidfd_budget, on_settled)
        self._members = members  # PID -> cgroup, the engine's, read only
        self._split = split  # PID -> its threads, of the processes split across cgroups
        self._on_threads = on_threads
        self._on_fork = on_fork
        # The daemon's own processes: never stopped or killed (the kernel never freezes or
        # kills itself).
        self._exempt = exempt
        self._freezer = Freezer(frozen, on_stopped, exempt, proc)
        self._connector = Connector.open() if use_connector else None
        self.mode = "proc connector" if self._connector else "/proc scan"
        if self._connector is None and use_connector:
            self.limitations.append(
                "the proc connector is closed to this daemon: forks are followed by scanning "
                "/proc, which cannot place a child whose member parent exited before the scan")
        if self._connector is not None:  # news of forks, as of exits
            self._news_ready.register(self._connector.fileno(), select.EPOLLIN)
        self._lost_at = -LOST_LOG_INTERVAL  # when lost events were last logged
        self._lost = 0  # times events were lost since
        # For scans: when a member joined (in ticks), and in scan mode the children it had
        # then, which stay where they were (start times are only as fine as a tick).
        self._joined: dict[int, tuple[int, set[int] | None]] = {}

    def _start(self, nursery: trio.Nursery) -> None:
        super()._start(nursery)
        if self._connector is not None:
            nursery.start_soon(self._follow_forks, self._connector)
        nursery.start_soon(self._freezer.run)

    async def _follow_forks(self, connector: Connector) -> None:
        """Forks change no file's notification (the parent was there): they are applied in
        batches, as rarely as the socket's room allows, and at once before anything that
        shows membership is answered (sync())."""
        while True:
            await trio.lowlevel.wait_readable(connector.fileno())
            logged(self.settle)
            if not self._members:
                connector.listen(forks=False)  # until watch() follows a process again
            await trio.sleep(FORK_INTERVAL)

    def _polling(self) -> bool:
        """In scan mode, the threads of split processes are looked at too."""
        return super()._polling() or (self._connector is None and bool(self._split))

    def _poll_step(self) -> None:
        if self._connector is None:
            logged(self.check_threads)
        super()._poll_step()

    # -- keeping the engine up to date ---------------------------------------------------------

    def sync(self) -> None:
        """Apply every fork and exit that happened until now, and stop again a frozen process
        that was resumed (where the freezer could not trace it)."""
        if self._connector is None and self._members:
            each(self._scan_for_children(), self._adopt_found)
            self.check_threads()
        self.settle()
        self._freezer.check(signalled_only=True)

    def _apply_exits(self) -> None:
        """The exits of watched processes, after the forks and thread changes the connector has
        queued (those made before the exits, so a child forked by a process that has exited
        since still joins its cgroup)."""
        for _ in range(SETTLE_ROUNDS):
            seen = len(self._exits)
            if self._connector is not None:
                self._drain_connector()
            exits, self._exits = self._exits, self._exits[seen:]
            if seen:
                each(exits[:seen], self._apply_exit)
            if not self._exits:  # no child was found exited as it was adopted
                break

    def _settled(self) -> None:
        if self._connector is not None and self._connector.forks:
            self._listen_for_thread_exits()
        elif self._connector is None and self._split:
            self._poll_wanted.set()  # their threads are looked at every POLL_INTERVAL

    def _drain_connector(self) -> None:
        assert self._connector is not None
        if self._connector.drain(self._members, self._split, self._apply_event):
            self._resync()

    def _apply_event(self, event: Fork | Thread) -> None:
        try:
            self._apply_one(event)
        except Exception:  # a bug, or a resource that ran out: this event alone is lost
            log.exception("process tracking: event %r failed", event)

    def _apply_one(self, event: Fork | Thread) -> None:
        if isinstance(event, Fork):
            if event.parent in self._members:
                self._adopt(event.parent, event.child, creator=event.creator)
            return
        threads = self._split.get(event.tgid)
        if threads is None:
            return
        if event.exited and event.tid in threads:
            self._on_threads(event.tgid, [t for t in threads if t != event.tid])
        elif not event.exited and event.tid not in threads:
            self._on_threads(event.tgid, [*threads, event.tid])
        else:
            return
        self._news = True

    def _resync(self) -> None:
        """Events were lost: find what /proc still tells (children of members, by parent)."""
        self._lost += 1
        now = time.monotonic()
        if now - self._lost_at >= LOST_LOG_INTERVAL:
            log.warning("process events were lost (ENOBUFS, %d times): looking at /proc "
                        "instead", self._lost)
            self._lost_at, self._lost = now, 0
        each(self._scan_for_children(), self._adopt_found)
        self.check_threads()

    def _listen_for_thread_exits(self) -> None:
        """Thread exits matter only while some process is split: ask for them only then (the
        threads' changes meanwhile are read from /proc)."""
        assert self._connector is not None
        wanted = bool(self._split)
        if wanted != self._connector.exits:
            self._connector.listen(forks=True, exits=wanted)
            if wanted:
                self.check_threads()

    def _scan_for_children(self) -> list[tuple[int, int, int]]:
        """Processes not followed yet, each (start time, parent PID, PID), oldest first: a
        child adopted first is a member for its own children further on (a grandchild is
        younger).  One followed already was placed once, and may have been moved since."""
        found = []
        for pid in self.all_pids():
            if pid in self._members:
                continue
            try:
                stat = read_stat(pid, proc=self._proc)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if self._watched.get(pid) != stat.start_time:
                found.append((stat.start_time, stat.ppid, pid))
        found.sort()
        return found

    def _adopt_found(self, found: tuple[int, int, int]) -> None:
        start, parent, child = found
        if parent in self._members and self._forked_after_join(parent, child, start):
            self._adopt(parent, child, start)

    def _forked_after_join(self, parent: int, child: int, start: int) -> bool:
        """Whether a child of a member was forked after the member joined: only such a child
        joins its cgroup.  Start times are only as fine as a tick: in the tick of the join,
        the children the member had then are told apart (scan mode), or, where they were not
        listed (connector mode, which needs this only after lost events), none joins."""
        joined, children_before = self._joined.get(parent, (0, None))
        if children_before is None:
            return start > joined
        return start >= joined and child not in children_before

    def check_threads(self) -> None:
        """The threads of split processes, as /proc lists them now (zombies left out)."""
        for pid, threads in list(self._split.items()):
            live = [tid for tid in self.threads(pid) if self._thread_lives(pid, tid)]
            if set(live) != set(threads):
                self._on_threads(pid, live)
                self._news = True

    def _thread_lives(self, pid: int, tid: int) -> bool:
        return alive(pid, tid, self._proc)

    def _adopt(self, parent: int, child: int, start: int | None = None,
               creator: int | None = None) -> None:
        """A member forked `child`: it joins the cgroup, and is followed until it exits."""
        if child in self._watched:
            # The kernel gave the PID to a new process: the one it was is gone, its own forks
            # told already (they came before its exit).
            self._apply_exit((child, self._watched[child]))
        if start is None:
            start = self.start_time_now(child)
        self._on_fork(parent, child, start, creator)
        self._news = True
        self._joined[child] = (start or 0, set())  # a member since its birth: all its children
        self._follow(child, start, None if start is None else self._open_pidfd(child))
        if start is not None:
            self.apply_freezer([child])

    def _forget(self, pid: int) -> None:
        self._freezer.exited(pid)
        self._joined.pop(pid, None)

    def _following(self) -> None:
        if self._connector is not None:  # before it can join a cgroup: its forks are told
            self._connector.listen(forks=True, exits=bool(self._split))

    # -- the freezer ---------------------------------------------------------------------------

    def apply_freezer(self, pids: Iterable[int]) -> None:
        """Stop the processes the freezer covers and let go of the ones it no longer does."""
        self._freezer.apply(pids)

    # -- what the engine cares about -------------------------------------------------------

    def resume(self, starts: Mapping[int, int]) -> None:
        for pid, start in starts.items():
            if pid in self._members:
                self.joined(pid, start)
            else:
                self.watch(pid, start)
        self.check_threads()  # threads of split processes that came or went meanwhile
        self.apply_freezer(self._members)

    def joined(self, pid: int, start: int | None = None) -> None:
        """pid became a member of a cgroup other than the root (see watch for `start`)."""
        children = self._children(pid) if self._connector is None else None
        self._joined[pid] = (_boot_ticks(), children)
        self.watch(pid, start)

    def check_signalable(self, pid: int) -> None:
        """A user's daemon acts only on processes it may signal, as kill(2) decides (EPERM)."""
        if os.geteuid() == 0:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise fail(errno.ESRCH) from None
        except PermissionError:
            raise fail(errno.EPERM, f"process {pid} is not yours to move") from None

    def _children(self, pid: int) -> set[int]:
        children: set[int] = set()
        try:
            for tid in os.listdir(f"{self._proc}/{pid}/task"):
                with open(f"{self._proc}/{pid}/task/{tid}/children") as f:
                    children.update(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass  # gone: it has no children to leave behind
        return children

    def all_pids(self) -> list[int]:
        return sorted(int(name) for name in os.listdir(self._proc) if name.isdigit())

    def threads(self, pid: int) -> list[int]:
        try:
            return sorted(int(tid) for tid in os.listdir(f"{self._proc}/{pid}/task"))
        except FileNotFoundError:
            return []

    def kill(self, pids: Iterable[int]) -> None:
        # Oldest first: a parent is killed before its children, so it never sees one die
        # (and goes on) before its own SIGKILL comes.
        for pid in sorted(pids, key=lambda pid: self._watched.get(pid) or 0):
            if pid in self._exempt:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("cgroup.kill cannot signal process %d", pid)
