"""Process tracking: what the kernel knows about processes, turned into engine calls.

Processes are read from /proc of the daemon's PID namespace.  A process attached to a cgroup
other than the root is watched through a pidfd, which becomes readable when it exits; its start
time is kept with it, so a PID reused by a new process is never taken for the old one.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterable

import trio

from .engine import fail

PF_NO_SETAFFINITY = 0x04000000  # kernel threads that must stay where they are


def _stat_fields(pid: int, proc: str) -> list[str]:
    """/proc/PID/stat fields after the command name (which may hold spaces and parentheses)."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].decode().split()


class ProcessTracker:
    def __init__(self, on_exit: Callable[[int], None], proc: str = "/proc") -> None:
        self._on_exit = on_exit
        self._proc = proc
        self._watched: dict[int, int] = {}  # PID -> start time, for attached processes
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start_time(self, pid: int) -> int:
        return int(_stat_fields(pid, self._proc)[19])

    # -- what the core files ask ---------------------------------------------------------------

    def thread_group(self, pid: int) -> int:
        try:
            fields = _stat_fields(pid, self._proc)
            with open(f"{self._proc}/{pid}/status", "rb") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration, ValueError):
            raise fail(errno.ESRCH) from None
        if int(fields[6]) & PF_NO_SETAFFINITY:
            raise fail(errno.EINVAL, "a kernel thread that cannot move")
        return tgid

    def all_pids(self) -> list[int]:
        return sorted(int(name) for name in os.listdir(self._proc) if name.isdigit())

    def threads(self, pid: int) -> list[int]:
        try:
            return sorted(int(tid) for tid in os.listdir(f"{self._proc}/{pid}/task"))
        except FileNotFoundError:
            return []

    def attached(self, pid: int) -> None:
        try:
            start = self.start_time(pid)
            pidfd = os.pidfd_open(pid)
        except (FileNotFoundError, ProcessLookupError):
            self._on_exit(pid)  # gone already
            return
        known = self._watched.get(pid)
        if known == start:
            os.close(pidfd)
            return
        self._watched[pid] = start
        assert self._nursery is not None, "the tracker runs before the file system answers"
        self._nursery.start_soon(self._wait_exit, pid, start, pidfd)

    def kill(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _wait_exit(self, pid: int, start: int, pidfd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        if self._watched.get(pid) == start:
            del self._watched[pid]
            self._on_exit(pid)
