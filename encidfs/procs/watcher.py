"""Processes followed to their exit: what every membership needs of the host's processes.

Each process followed (a holder of IDs; in the standalone tree, a member too) is watched through
a pidfd, which becomes readable when it exits; its start time is kept with it, so a PID reused
by a new process is never taken for the old one.  Past the daemon's budget of descriptors, a
process is looked at in /proc instead, on every settle() and every POLL_INTERVAL.  `settle()`
applies the exits that have happened (one epoll_wait, no waiting) before anything that shows
them is answered; a task applies them too, as they come, in batches.  Besides, PIDs as another
PID namespace names them, and what /proc tells of a process.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import trio

from ..engine import fail
from .pidns import PidNamespaces
from .procfs import read_stat

log = logging.getLogger(__name__)
T = TypeVar("T")

PF_NO_SETAFFINITY = 0x04000000  # kernel threads that must stay where they are
POLL_INTERVAL = 0.1  # seconds between looks at the processes watched without a pidfd
# Seconds at least between two wake-ups for exits: a wake-up costs the daemon some 100-300 us
# of CPU whatever it does.
EXIT_INTERVAL = 0.005
EPOLL_BATCH = 1023  # what epoll.poll() returns at most (FD_SETSIZE - 1)


def logged(step: Callable[[], None]) -> None:
    """A step of a task that runs for the daemon's lifetime: a failure (a bug, or a resource
    that ran out) is logged, and the task goes on."""
    try:
        step()
    except Exception:
        log.exception("process tracking: %s failed", step.__name__)


def each(items: Iterable[T], apply: Callable[[T], None]) -> None:
    """apply() to each item; a failure (a bug, or a resource that ran out) is logged and
    costs that item alone."""
    for item in items:
        try:
            apply(item)
        except Exception:
            log.exception("process tracking: %s(%r) failed", apply.__name__, item)


class ProcessWatcher:
    def __init__(self, on_exit: Callable[[int], None], proc: str = "/proc",
                 pidfd_budget: int = 1 << 30,
                 on_settled: Callable[[], None] = lambda: None) -> None:
        self.mode = "holders only"  # for status: how processes are followed
        self.limitations: list[str] = []  # what the daemon would do but cannot, for status
        self._on_exit = on_exit
        self._on_settled = on_settled  # once after a batch of changes
        self._proc = proc
        self._namespaces = PidNamespaces(proc)
        self._watched: dict[int, int | None] = {}  # PID -> start time (None: found exited)
        self._pidfd_budget = pidfd_budget
        self._exited = select.epoll()  # the pidfds of watched processes: readable once exited
        # Whether there is news at all: what settle() asks when there is none, as before
        # every read, costs one epoll_wait.
        self._news_ready = select.epoll()
        self._news_ready.register(self._exited.fileno(), select.EPOLLIN)
        self._pidfds: dict[int, tuple[int, int]] = {}  # pidfd -> (PID, start time)
        self._pidfd_of: dict[int, int] = {}  # PID -> its pidfd
        self._polled: set[int] = set()
        # Exits seen and not applied yet, each (PID, start time).
        self._exits: list[tuple[int, int | None]] = []
        self._news = False  # changes applied since on_settled()
        # The pidfd and start time thread_group() found for a process not followed yet.
        self._opened: tuple[int, int, int | None] | None = None
        self._poll_wanted = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._start(nursery)
            task_status.started()

    def _start(self, nursery: trio.Nursery) -> None:
        """The tasks that follow what happens."""
        nursery.start_soon(self._follow_exits)
        nursery.start_soon(self._poll)

    async def _follow_exits(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._exited.fileno())
            logged(self.settle)
            await trio.sleep(EXIT_INTERVAL)  # a burst is taken in batches

    async def _poll(self) -> None:
        """Processes watched without a pidfd are looked at every POLL_INTERVAL while there are
        any (and whatever else _polling() wants looked at)."""
        while True:
            if not self._polling():
                self._poll_wanted = trio.Event()
                await self._poll_wanted.wait()
            await trio.sleep(POLL_INTERVAL)
            logged(self._poll_step)

    def _polling(self) -> bool:
        return bool(self._polled)

    def _poll_step(self) -> None:
        self.settle()  # the exits seen, and what changed told

    # -- keeping the engine up to date ---------------------------------------------------------

    def sync(self) -> None:
        """Apply everything that happened until now."""
        self.settle()

    def settle(self) -> None:
        """Apply the exits of watched processes told until now."""
        if self._news_ready.poll(0) or self._exits or self._polled:
            self._take_exited()
            self._apply_exits()
        self._settled()
        if self._news:
            self._news = False
            self._on_settled()

    def _apply_exits(self) -> None:
        exits, self._exits = self._exits, []
        each(exits, self._apply_exit)

    def _settled(self) -> None:
        """After a settle(), before what changed is told."""

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
        self._forget(pid)
        self._on_exit(pid)
        self._news = True

    def _forget(self, pid: int) -> None:
        """What else is kept of a process that exited."""

    def start_time_now(self, pid: int) -> int | None:
        """When the process started (ticks since boot), as /proc says now: None for no
        process, or one that has exited (a zombie)."""
        try:
            stat = read_stat(pid, proc=self._proc)
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None if stat.state in ("Z", "X") else stat.start_time

    # -- following a process -------------------------------------------------------------------

    def watch(self, pid: int, start: int | None = None) -> int | None:
        """Call on_exit(pid) when this process exits, at once if it has exited already (a
        zombie too); return when it started if it lives, else None (callers sync() first:
        a process followed is taken to live until its exit is seen).  With `start`, the
        process is the one that started then (one restored from the journal): another one
        with its PID means it has exited."""
        followed = self._watched.get(pid)
        if followed is not None and start in (None, followed):
            return followed  # its pidfd not readable at the caller's sync()
        self._following()
        if pid in self._watched:
            # The process followed by this PID is gone (found exited, or another has it now):
            # its exit first.
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

    def resume(self, starts: Mapping[int, int]) -> None:
        """Follow again the processes a restored state has, each the one that started then."""
        for pid, start in starts.items():
            self.watch(pid, start)

    def _following(self) -> None:
        """Before a process not followed yet is."""

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
                stat = read_stat(pid, proc=self._proc)
                tgid = pid if pidfd is not None else self._tgid(pid)
            except (FileNotFoundError, ProcessLookupError):
                raise fail(errno.ESRCH) from None
            if stat.flags & PF_NO_SETAFFINITY:
                raise fail(errno.EINVAL, "a kernel thread that cannot move")
            on_failure.pop_all()
        if pidfd is not None:
            if self._opened is not None:
                os.close(self._opened[1])
            start = None if stat.state in ("Z", "X") else stat.start_time
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

    def owners(self, pid: int) -> tuple[int, int]:
        """A process's real and saved UIDs, those kill(2) compares (ESRCH if there is none)."""
        try:
            with open(f"{self._proc}/{pid}/status", "rb") as f:
                uids = next(line.split()[1:] for line in f if line.startswith(b"Uid:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            raise fail(errno.ESRCH) from None
        return int(uids[0]), int(uids[2])
