"""Process tracking: what the kernel knows about processes, turned into engine calls.

Processes are read from /proc of the daemon's PID namespace.  Every process the engine cares
about (a member of a cgroup other than the root, or a holder of IDs) is watched through a pidfd,
which becomes readable when it exits; its start time is kept with it, so a PID reused by a new
process is never taken for the old one.  The pidfds wait in one epoll set: the kernel takes a
task out of its cgroup in do_exit, before its parent can reap it, so `settle()` applies the
exits that have happened (one epoll_wait, no waiting) before anything that shows membership
or holdings is answered; the event loop applies them too, as they come.

A process forked by a member joins its parent's cgroup.  With the privilege for it, fork events
come from the kernel's process events connector; without it, /proc is scanned for children of
members (by parent PID: started after the parent joined, and not among its children then).
Either way `sync()` brings the engine up to date before anything that depends on membership is
answered.

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

import trio

from ..engine import fail
from .connector import Fork, events, open_connector

log = logging.getLogger(__name__)

PF_NO_SETAFFINITY = 0x04000000  # kernel threads that must stay where they are
POLL_INTERVAL = 0.1  # seconds between looks at the processes watched without a pidfd
_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(proc: str, pid: int) -> list[str]:
    """/proc/PID/stat fields from the state on (the command name may hold anything)."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].decode().split()


def _logged(step: Callable[[], None]) -> None:
    """A step of a task that runs for the daemon's lifetime: a failure (a bug, or a resource
    that ran out) is logged, and the task goes on."""
    try:
        step()
    except Exception:
        log.exception("process tracking: %s failed", step.__name__)


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
                 on_threads: Callable[[int, list[int]], None] = lambda pid, tids: None) -> None:
        self._members = members  # PID -> cgroup, the engine's, read only
        self._split = split  # PID -> its threads, of the processes split across cgroups
        self._on_threads = on_threads
        self._on_fork = on_fork
        self._on_exit = on_exit
        self._frozen = frozen  # whether the freezer covers a process's cgroup
        self._on_stopped = on_stopped
        self._proc = proc
        # The daemon's own processes: never stopped or killed (the kernel never freezes
        # itself); the freezer counts them as stopped, so that `frozen` is reached.
        self._exempt = exempt
        self._connector = open_connector() if use_connector else None
        self.mode = "proc connector" if self._connector else "/proc scan"
        # What the daemon would do but cannot, for `status` to say once.
        self.limitations = [] if self._connector or not use_connector else [
            "the proc connector is closed to this daemon: forks are followed by scanning /proc, "
            "which cannot place a child whose member parent exited before the scan"]
        self._watched: dict[int, int] = {}  # PID -> start time
        # Watched through a pidfd while the daemon's descriptors allow it; past that budget
        # (or on EMFILE), by looking at /proc on every sync() and every POLL_INTERVAL.
        self._pidfd_budget = pidfd_budget
        # The connector and the pidfds of watched processes, readable when there is news.
        self._events = select.epoll()
        if self._connector is not None:
            self._events.register(self._connector, select.EPOLLIN)
        self._pidfds: dict[int, tuple[int, int]] = {}  # pidfd -> (PID, start time)
        self._polled: set[int] = set()
        # The pidfd and start time thread_group() found for a process not followed yet.
        self._opened: tuple[int, int, int | None] | None = None
        self._stopped: set[int] = set()  # PIDs the freezer sent SIGSTOP (seen stopped or not)
        # For scans: when a member joined (in ticks), and in scan mode the children it had
        # then, which stay where they were (start times are only as fine as a tick).
        self._joined: dict[int, tuple[int, set[int] | None]] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._poll_exits)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(self._events.fileno())
                _logged(self.settle)

    async def _poll_exits(self) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            _logged(self._check_polled)
            if self._connector is None:
                _logged(self.check_threads)

    # -- keeping the engine up to date ---------------------------------------------------------

    def sync(self) -> None:
        """Apply every fork and exit that happened until now."""
        if self._connector is None and self._members:
            self._scan()
            self.check_threads()
        self.settle()

    def settle(self) -> None:
        """Apply what the kernel has told until now: the forks and thread changes the
        connector reported, then the exits (one epoll_wait when nothing happened)."""
        ready = self._events.poll(0)
        if self._connector is not None and any(fd == self._connector.fileno()
                                               for fd, _ in ready):
            self._drain_connector()
        for pidfd, _ in ready:
            watched = self._pidfds.pop(pidfd, None)
            if watched is None:
                continue  # the connector
            self._events.unregister(pidfd)
            os.close(pidfd)
            pid, start = watched
            if self._watched.get(pid) == start:
                self._exited(pid)
        if self._polled:
            self._check_polled()

    def _drain_connector(self) -> None:
        assert self._connector is not None
        while True:
            try:
                datagram = self._connector.recv(65536)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                log.warning("process events were lost (ENOBUFS): looking at /proc instead")
                self._scan()
                self.check_threads()
                continue
            for event in events(datagram):
                if isinstance(event, Fork):
                    if event.parent in self._members:
                        self._adopt(event.parent, event.child, creator=event.creator)
                elif event.tgid in self._split:
                    threads = self._split[event.tgid]
                    if event.exited and event.tid in threads:
                        self._on_threads(event.tgid, [t for t in threads if t != event.tid])
                    elif not event.exited and event.tid not in threads:
                        self._on_threads(event.tgid, [*threads, event.tid])

    def _scan(self) -> None:
        """Children of members that the engine does not know, oldest first: a child adopted
        here is a member for its own children further on (a grandchild is younger)."""
        found = []
        for pid in self.all_pids():
            if pid in self._members:
                continue
            try:
                fields = _stat_fields(self._proc, pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.append((int(fields[19]), int(fields[1]), pid))
        for start, parent, child in sorted(found):
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

    def _thread_lives(self, pid: int, tid: int) -> bool:
        try:
            with open(f"{self._proc}/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")

    def _adopt(self, parent: int, child: int, start: int | None = None,
               creator: int | None = None) -> None:
        start = self.start_time_now(child) if start is None else start
        self._on_fork(parent, child, start, creator)
        if start is not None and self._connector is None:
            self._joined[child] = (start, set())  # a member since its birth: all its children
            self.watch(child)
        else:
            self.joined(child)
        self.apply_freezer([child])

    # -- the freezer ---------------------------------------------------------------------------

    def apply_freezer(self, pids: Iterable[int]) -> None:
        """Stop the processes the freezer covers and resume the ones it no longer does.

        The kernel's freezer is invisible to the frozen; SIGSTOP/SIGCONT are what user space
        has, and a parent waiting with WUNTRACED sees them."""
        for pid in pids:
            try:
                frozen = self._frozen(pid)
                if frozen and pid not in self._stopped:
                    self._stopped.add(pid)
                    if pid in self._exempt:
                        self._on_stopped(pid, True)
                        continue
                    os.kill(pid, signal.SIGSTOP)
                    assert self._nursery is not None
                    self._nursery.start_soon(self._wait_stopped, pid)
                elif not frozen and pid in self._stopped:
                    self._stopped.discard(pid)  # only what the freezer stopped, it resumes
                    if pid not in self._exempt:
                        os.kill(pid, signal.SIGCONT)
                    self._on_stopped(pid, False)
            except ProcessLookupError:
                pass  # its exit is on its way
            except PermissionError:  # a user's daemon, and a child that became setuid
                log.warning("the freezer cannot signal process %d", pid)

    async def _wait_stopped(self, pid: int) -> None:
        """Report the process stopped once /proc says so (SIGSTOP takes effect asynchronously)."""
        delay = 0.0005
        while pid in self._stopped:
            try:
                state = _stat_fields(self._proc, pid)[0]
            except (FileNotFoundError, ProcessLookupError):
                return  # its exit is on its way
            if state in ("T", "t"):
                self._on_stopped(pid, True)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def start_time_now(self, pid: int) -> int | None:
        """When the process started (ticks since boot), as /proc says now: None for no
        process, or one that has exited (a zombie)."""
        try:
            fields = _stat_fields(self._proc, pid)
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
        if start is None and pid in self._watched:
            return self._watched[pid]  # its pidfd not readable at the caller's sync()
        opened, self._opened = self._opened, None
        if opened is not None and opened[0] == pid:
            _, pidfd, now = opened  # thread_group() found it a moment ago
        else:
            if opened is not None:
                os.close(opened[1])
            pidfd, now = None, self.start_time_now(pid)
        expected = self._watched.get(pid, start)
        followed = pid in self._watched and now == expected  # a restored process, say
        if not followed and expected is not None and now != expected:
            self._exited(pid)  # the process known by this PID is gone (the PID may be reused)
            if start is not None:
                now = None
        elif not followed and now is None:
            self._exited(pid)  # a zombie: whatever it held is freed
        if followed or now is None:
            if pidfd is not None:
                os.close(pidfd)
            return now
        self._watched[pid] = now
        if pidfd is None and len(self._pidfds) < self._pidfd_budget:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._exited(pid)
                return None
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise
        elif pidfd is not None and len(self._pidfds) >= self._pidfd_budget:
            os.close(pidfd)
            pidfd = None
        if pidfd is None:
            self._polled.add(pid)
        else:
            self._pidfds[pidfd] = (pid, now)
            self._events.register(pidfd, select.EPOLLIN)
        return now

    def follows(self, pid: int, start: int) -> bool:
        """Whether the process that started then is followed still (its exit not seen)."""
        return self._watched.get(pid) == start

    def _check_polled(self) -> None:
        for pid in [pid for pid in self._polled if self.start_time_now(pid) != self._watched[pid]]:
            self._exited(pid)

    def _exited(self, pid: int) -> None:
        if self._connector is not None:
            self._drain_connector()  # forks it made before exiting come first
        self._polled.discard(pid)
        self._watched.pop(pid, None)
        self._stopped.discard(pid)
        self._joined.pop(pid, None)
        self._on_exit(pid)

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
                fields = _stat_fields(self._proc, pid)
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
