"""Process tracking: what the kernel knows about processes, turned into engine calls.

Processes are read from /proc of the daemon's PID namespace.  Every process the engine cares
about (a member of a cgroup other than the root, or a holder of IDs) is watched through a pidfd,
which becomes readable when it exits; its start time is kept with it, so a PID reused by a new
process is never taken for the old one.  The kernel takes a task out of its cgroup in do_exit,
before its parent can reap it, so `settle()` applies the exits that have happened (one
epoll_wait, no waiting) before anything that shows membership or holdings is answered; a task
applies them too, as they come, in batches.

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

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import trio

from ..engine import fail
from .connector import Connector, Fork, Thread
from .freezer import Freezer
from .pidns import PidNamespaces
from .procfs import stat_fields, thread_state

log = logging.getLogger(__name__)
T = TypeVar("T")

PF_NO_SETAFFINITY = 0x04000000  # kernel threads that must stay where they are
POLL_INTERVAL = 0.1  # seconds between looks at the processes watched without a pidfd
# Seconds at least between two wake-ups for exits, and for forks: a wake-up costs the daemon
# some 100-300 us of CPU whatever it does, a fork event 2 us.
EXIT_INTERVAL = 0.005
FORK_INTERVAL = 0.05
SETTLE_ROUNDS = 16  # connector drains a settle() makes for children found exited on adoption
EPOLL_BATCH = 1023  # what epoll.poll() returns at most (FD_SETSIZE - 1)
LOST_LOG_INTERVAL = 5.0  # seconds: lost events are logged at most this often
_TICKS = os.sysconf("SC_CLK_TCK")


def _logged(step: Callable[[], None]) -> None:
    """A step of a task that runs for the daemon's lifetime: a failure (a bug, or a resource
    that ran out) is logged, and the task goes on."""
    try:
        step()
    except Exception:
        log.exception("process tracking: %s failed", step.__name__)


def _each(items: Iterable[T], apply: Callable[[T], None]) -> None:
    """apply() to each item; a failure (a bug, or a resource that ran out) is logged and
    costs that item alone."""
    for item in items:
        try:
            apply(item)
        except Exception:
            log.exception("process tracking: %s(%r) failed", apply.__name__, item)


def _boot_ticks() -> int:
    """Now, in the unit of /proc/PID/stat start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


class ProcessTracker:
    def __init__(self, members: Mapping[int, object],
                 on_fork: Callable[[int, int, int | None, int | None], None],
                 on_exit: Callable[[int], None], frozen: Callable[[int], bool],
                 on_stopped: Callable[[int, bool], None], proc: str = "/proc",
                 use_connector: bool = True, exempt: frozenset[int] = frozenset(),
                 pidfd_budget: int = 1 << 30, split: Mapping[int, Mapping[int, object]] = {},
                 on_threads: Callable[[int, list[int]], None] = lambda pid, tids: None,
                 on_settled: Callable[[], None] = lambda: None) -> None:
        self._members = members  # PID -> cgroup, the engine's, read only
        self._split = split  # PID -> its threads, of the processes split across cgroups
        self._on_threads = on_threads
        self._on_fork = on_fork
        self._on_exit = on_exit
        self._on_settled = on_settled  # once after a batch of forks, exits and thread changes
        self._proc = proc
        # The daemon's own processes: never stopped or killed (the kernel never freezes or
        # kills itself).
        self._exempt = exempt
        self._freezer = Freezer(frozen, on_stopped, exempt, proc)
        self._namespaces = PidNamespaces(proc)
        self._connector = Connector.open() if use_connector else None
        self.mode = "proc connector" if self._connector else "/proc scan"
        # What the daemon would do but cannot, for `status` to say once.
        self.limitations = [] if self._connector or not use_connector else [
            "the proc connector is closed to this daemon: forks are followed by scanning /proc, "
            "which cannot place a child whose member parent exited before the scan"]
        self._watched: dict[int, int | None] = {}  # PID -> start time (None: found exited)
        # Watched through a pidfd while the daemon's descriptors allow it; past that budget
        # (or on EMFILE), by looking at /proc on every sync() and every POLL_INTERVAL.
        self._pidfd_budget = pidfd_budget
        self._exited = select.epoll()  # the pidfds of watched processes: readable once exited
        # Whether there is news at all (exits, or events): what settle() asks when there is
        # none, as before every read, costs one epoll_wait.
        self._news_ready = select.epoll()
        self._news_ready.register(self._exited.fileno(), select.EPOLLIN)
        if self._connector is not None:
            self._news_ready.register(self._connector.fileno(), select.EPOLLIN)
        self._pidfds: dict[int, tuple[int, int]] = {}  # pidfd -> (PID, start time)
        self._pidfd_of: dict[int, int] = {}  # PID -> its pidfd
        self._polled: set[int] = set()
        # Exits seen and not applied yet, each (PID, start time): an exit is applied only once
        # the forks queued before it was seen are (a child forked just before its parent
        # exited joins the parent's cgroup).
        self._exits: list[tuple[int, int | None]] = []
        self._news = False  # forks, exits or thread changes applied since on_settled()
        self._lost_at = -LOST_LOG_INTERVAL  # when lost events were last logged
        self._lost = 0  # times events were lost since
        # The pidfd and start time thread_group() found for a process not followed yet.
        self._opened: tuple[int, int, int | None] | None = None
        # For scans: when a member joined (in ticks), and in scan mode the children it had
        # then, which stay where they were (start times are only as fine as a tick).
        self._joined: dict[int, tuple[int, set[int] | None]] = {}
        self._poll_wanted = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_exits)
            if self._connector is not None:
                nursery.start_soon(self._follow_forks, self._connector)
            nursery.start_soon(self._poll)
            nursery.start_soon(self._freezer.run)
            task_status.started()

    async def _follow_exits(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._exited.fileno())
            _logged(self.settle)
            await trio.sleep(EXIT_INTERVAL)  # a burst is taken in batches

    async def _follow_forks(self, connector: Connector) -> None:
        """Forks change no file's notification (the parent was there): they are applied in
        batches, as rarely as the socket's room allows, and at once before anything that
        shows membership is answered (sync())."""
        while True:
            await trio.lowlevel.wait_readable(connector.fileno())
            _logged(self.settle)
            if not self._members:
                connector.listen(forks=False)  # until watch() follows a process again
            await trio.sleep(FORK_INTERVAL)

    async def _poll(self) -> None:
        """Processes watched without a pidfd, and in scan mode the threads of split ones, are
        looked at every POLL_INTERVAL while there are any."""
        while True:
            if not self._polled and (self._connector is not None or not self._split):
                self._poll_wanted = trio.Event()
                await self._poll_wanted.wait()
            await trio.sleep(POLL_INTERVAL)
            if self._connector is None:
                _logged(self.check_threads)
            _logged(self.settle)  # the exits seen, and what changed told

    # -- keeping the engine up to date ---------------------------------------------------------

    def sync(self) -> None:
        """Apply every fork and exit that happened until now, and stop again a frozen process
        that was resumed (where the freezer could not trace it)."""
        if self._connector is None and self._members:
            _each(self._scan_for_children(), self._adopt_found)
            self.check_threads()
        self.settle()
        self._freezer.check(signalled_only=True)

    def settle(self) -> None:
        """Apply what the kernel has told until now: the exits of watched processes, after the
        forks and thread changes the connector has queued (those made before the exits, so a
        child forked by a process that has exited since still joins its cgroup)."""
        if self._news_ready.poll(0) or self._exits or self._polled:
            self._take_exited()
            for _ in range(SETTLE_ROUNDS):
                seen = len(self._exits)
                if self._connector is not None:
                    self._drain_connector()
                exits, self._exits = self._exits, self._exits[seen:]
                if seen:
                    _each(exits[:seen], self._apply_exit)
                if not self._exits:  # no child was found exited as it was adopted
                    break
        if self._connector is not None and self._connector.forks:
            self._listen_for_thread_exits()
        elif self._connector is None and self._split:
            self._poll_wanted.set()  # their threads are looked at every POLL_INTERVAL
        if self._news:
            self._news = False
            self._on_settled()

    def _take_exited(self) -> None:
        """Queue the exits the pidfds (and, past their budget, /proc) tell of."""
        while True:
            ready = self._exited.poll(0)
            for pidfd, _ in ready:
                watched = self._pidfds.pop(pidfd)
                self._exited.unregister(pidfd)
                os.close(pidfd)
                del self._pidfd_of[watched[0]]
                self._exits.append(watched)
            if len(ready) < EPOLL_BATCH:
                break
        if self._polled:
            self._exits.extend((pid, self._watched[pid]) for pid in self._polled
                               if self.start_time_now(pid) != self._watched[pid])

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
        _each(self._scan_for_children(), self._adopt_found)
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
                fields = stat_fields(self._proc, pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            start = int(fields[19])
            if self._watched.get(pid) != start:
                found.append((start, int(fields[1]), pid))
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
        return thread_state(self._proc, pid, tid) not in (None, "Z", "X")

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

    def _open_pidfd(self, pid: int) -> int | None:
        """A pidfd of the process, within the budget; None past it, or for no process."""
        if len(self._pidfds) >= self._pidfd_budget:
            return None
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as error:
            if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            return None

    def _follow(self, pid: int, start: int | None, pidfd: int | None) -> None:
        """Watch a process: by its pidfd, or past the budget by /proc.  One found exited
        (`start` None) is queued to exit."""
        self._watched[pid] = start
        if start is None:
            if pidfd is not None:
                os.close(pidfd)
            self._exits.append((pid, None))
        elif pidfd is None:
            self._polled.add(pid)
            self._poll_wanted.set()
        else:
            self._pidfds[pidfd] = (pid, start)
            self._pidfd_of[pid] = pidfd
            self._exited.register(pidfd, select.EPOLLIN)

    def _apply_exit(self, exited: tuple[int, int | None]) -> None:
        """An exit seen: applied if the process it was seen for is (still) the one watched by
        its PID, or is not watched at all."""
        pid, start = exited
        if pid in self._watched and self._watched[pid] != start:
            return  # the PID was watched anew since, for another process
        self._watched.pop(pid, None)
        self._polled.discard(pid)
        pidfd = self._pidfd_of.pop(pid, None)
        if pidfd is not None:
            del self._pidfds[pidfd]
            self._exited.unregister(pidfd)
            os.close(pidfd)
        self._freezer.exited(pid)
        self._joined.pop(pid, None)
        self._on_exit(pid)
        self._news = True

    # -- the freezer ---------------------------------------------------------------------------

    def apply_freezer(self, pids: Iterable[int]) -> None:
        """Stop the processes the freezer covers and let go of the ones it no longer does."""
        self._freezer.apply(pids)

    def start_time_now(self, pid: int) -> int | None:
        """When the process started (ticks since boot), as /proc says now: None for no
        process, or one that has exited (a zombie)."""
        try:
            fields = stat_fields(self._proc, pid)
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None if fields[0] in ("Z", "X") else int(fields[19])

    # -- what the engine cares about -------------------------------------------------------

    def joined(self, pid: int, start: int | None = None) -> None:
        """pid became a member of a cgroup other than the root (see watch for `start`)."""
        children = self._children(pid) if self._connector is None else None
        self._joined[pid] = (_boot_ticks(), children)
        self.watch(pid, start)

    def watch(self, pid: int, start: int | None = None) -> int | None:
        """Call on_exit(pid) when this process exits, at once if it has exited already (a
        zombie too); return when it started if it lives, else None (callers sync() first:
        a process followed is taken to live until its exit is seen).  With `start`, the
        process is the one that started then (one restored from the journal): another one
        with its PID means it has exited."""
        followed = self._watched.get(pid)
        if followed is not None and start in (None, followed):
            return followed  # its pidfd not readable at the caller's sync()
        if self._connector is not None:  # before it can join a cgroup: its forks are told
            self._connector.listen(forks=True, exits=bool(self._split))
        if pid in self._watched:
            # The process followed by this PID is gone (found exited, or another has it now):
            # its exit first, once the forks it made are placed.
            self._exits.append((pid, followed))
            self.settle()
        opened, self._opened = self._opened, None
        if opened is not None and opened[0] == pid:
            _, pidfd, now = opened  # thread_group() found it a moment ago
        else:
            if opened is not None:
                os.close(opened[1])
            pidfd, now = None, self.start_time_now(pid)
        if now is None or (start is not None and now != start):
            # A zombie, or not the process restored: whatever it held is freed.
            if pidfd is not None:
                os.close(pidfd)
            self._exits.append((pid, None))
            self.settle()
            return None
        if pidfd is None:
            pidfd = self._open_pidfd(pid)
        elif len(self._pidfds) >= self._pidfd_budget:
            os.close(pidfd)
            pidfd = None
        self._follow(pid, now, pidfd)
        return now

    def follows(self, pid: int, start: int) -> bool:
        """Whether the process that started then is followed still (its exit not seen)."""
        return self._watched.get(pid) == start

    # -- reading /proc -------------------------------------------------------------------------

    def thread_group(self, pid: int) -> int:
        """The TGID of a PID or TID (ESRCH if none, EINVAL for a kernel thread that must stay).

        A process followed costs nothing (sync() settled its exit: its PID is still its own);
        another, a pidfd (which only a thread group's leader has) and one read of /proc, both
        kept for the watch() that follows."""
        if pid in self._watched:
            return pid
        pidfd = None
        if len(self._pidfds) < self._pidfd_budget:
            try:
                pidfd = os.pidfd_open(pid)
            except (ProcessLookupError, OverflowError):  # none, or a number no PID can be
                raise fail(errno.ESRCH) from None
            except OSError as error:  # a thread's TID (not a leader), or no descriptor left
                if error.errno not in (errno.ENOENT, errno.EINVAL, errno.EMFILE, errno.ENFILE,
                                       errno.ENOMEM):
                    raise
        with contextlib.ExitStack() as on_failure:
            if pidfd is not None:
                on_failure.callback(os.close, pidfd)
            try:
                fields = stat_fields(self._proc, pid)
                tgid = pid if pidfd is not None else self._tgid(pid)
            except (FileNotFoundError, ProcessLookupError):
                raise fail(errno.ESRCH) from None
            if int(fields[6]) & PF_NO_SETAFFINITY:
                raise fail(errno.EINVAL, "a kernel thread that cannot move")
            on_failure.pop_all()
        if pidfd is not None:
            if self._opened is not None:
                os.close(self._opened[1])
            start = None if fields[0] in ("Z", "X") else int(fields[19])
            self._opened = (pid, pidfd, start)
        return tgid

    def _tgid(self, pid: int) -> int:
        with open(f"{self._proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
        raise ProcessLookupError(pid)  # a status without it: gone as it was read

    def pid_from(self, caller: int, pid: int, thread: bool = False) -> int:
        """The PID (TID) that process `caller` names `pid`, in the daemon's PID namespace;
        ESRCH if the caller can see no such process."""
        ns = self._namespaces.of(caller)
        return pid if ns is None else self._namespaces.to_ours(ns, pid, thread)

    def foreign(self, caller: int) -> bool:
        """Whether process `caller` lives in a PID namespace other than the daemon's (or is
        gone: it sees nothing)."""
        try:
            return self._namespaces.of(caller) is not None
        except ProcessLookupError:
            return True

    def pids_for(self, caller: int, pids: list[int]) -> list[int]:
        """PIDs (TIDs) as process `caller` sees them: 0 for one outside its namespace (or
        all, for a caller gone since)."""
        try:
            ns = self._namespaces.of(caller)
        except ProcessLookupError:
            return [0] * len(pids)
        return pids if ns is None else self._namespaces.from_ours(ns, pids)

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

    def owners(self, pid: int) -> tuple[int, int]:
        """A process's real and saved UIDs, those kill(2) compares (ESRCH if there is none)."""
        try:
            with open(f"{self._proc}/{pid}/status", "rb") as f:
                uids = next(line.split()[1:] for line in f if line.startswith(b"Uid:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            raise fail(errno.ESRCH) from None
        return int(uids[0]), int(uids[2])

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
        for pid in sorted(pids, key=lambda pid: self._watched.get(pid, 0)):
            if pid in self._exempt:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("cgroup.kill cannot signal process %d", pid)
