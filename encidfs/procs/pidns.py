"""PIDs as a caller in another PID namespace names them.

The daemon knows every process by its PID in its own namespace.  A caller in a namespace below
it (a container, `unshare --pid`) names processes, and is shown them, by the PIDs of its own, as
the kernel reads a PID written to cgroup.procs (find_task_by_vpid()) and prints one
(task_pid_vnr(): 0 for a process outside the reader's namespace).  /proc/PID/status's NSpid
gives a process's PID in each namespace from the daemon's down to its own; NS_GET_PARENT walks
a namespace up, to tell the caller's namespace from another one as deep.  A caller in the
daemon's namespace costs one readlink(2).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import NamedTuple

from ..engine import fail

NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2)


class Namespace(NamedTuple):
    """A PID namespace below the daemon's: its nsfs inode, and how deep below."""

    ino: int
    depth: int


class PidNamespaces:
    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._own = os.readlink(f"{proc}/self/ns/pid")  # "pid:[inode]": one file system

    def of(self, pid: int) -> Namespace | None:
        """The namespace process `pid` (the daemon's PID) lives in; None for the daemon's own.
        PID 0 (one FUSE could not name: outside the daemon's namespace) sees nothing."""
        if pid == 0:
            return Namespace(0, -1)
        try:
            link = os.readlink(f"{self._proc}/{pid}/ns/pid")  # half what a stat(2) costs
            if link == self._own:
                return None
            depth = len(self._nspid(pid)) - 1
        except (FileNotFoundError, ProcessLookupError):
            raise fail(errno.ESRCH, f"process {pid} has exited") from None
        return Namespace(int(link[link.index("[") + 1:-1]), depth)

    def to_ours(self, ns: Namespace, pid: int, thread: bool = False) -> int:
        """The daemon's PID of the process (TID of the thread, if `thread`) that `ns` calls
        `pid`; ESRCH if it has none there."""
        for ours in self._candidates(thread):
            try:
                nspid = self._nspid(ours)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if len(nspid) > ns.depth >= 0 and nspid[ns.depth] == pid \
                    and self._within(ours, len(nspid) - 1, ns):
                return ours
        raise fail(errno.ESRCH, f"no process {pid} in the caller's PID namespace")

    def from_ours(self, ns: Namespace, pids: list[int]) -> list[int]:
        """The PIDs (or TIDs) as `ns` sees them: 0 for one outside it."""
        seen = []
        for pid in pids:
            try:
                nspid = self._nspid(pid)
                inside = len(nspid) > ns.depth >= 0 and self._within(pid, len(nspid) - 1, ns)
            except (FileNotFoundError, ProcessLookupError):
                inside = False  # gone as it was read: as good as outside
            seen.append(nspid[ns.depth] if inside else 0)
        return seen

    def _candidates(self, thread: bool) -> list[int]:
        pids = [int(name) for name in os.listdir(self._proc) if name.isdigit()]
        if not thread:
            return pids
        tids: list[int] = []
        for pid in pids:
            try:
                tids += (int(tid) for tid in os.listdir(f"{self._proc}/{pid}/task"))
            except FileNotFoundError:
                continue
        return tids

    def _nspid(self, pid: int) -> list[int]:
        with open(f"{self._proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(word) for word in line.split()[1:]]
        return [pid]  # a kernel without NSpid (before 4.1) has no namespaces to tell

    def _within(self, pid: int, depth: int, ns: Namespace) -> bool:
        """Whether the namespace of process `pid`, `depth` below the daemon's, is `ns` or below
        it."""
        fd = os.open(f"{self._proc}/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for _ in range(depth - ns.depth):
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
                os.close(fd)
                fd = parent
            found = os.fstat(fd)
        finally:
            os.close(fd)
        return found.st_ino == ns.ino
