"""The process whose system call `encidfs exec` answers (a seccomp notification's caller):
its memory and its descriptors, reached through /proc/PID/mem and pidfd_getfd(2).

Whatever is read may be stale by the time it is used: the supervisor checks that the caller
still waits (SECCOMP_IOCTL_NOTIF_ID_VALID) before it acts on it.
"""

from __future__ import annotations

import ctypes
import errno
import os

_PATH_MAX = 4096
_NR_PIDFD_GETFD = 438  # the same on every architecture (the generic table's)
_libc = ctypes.CDLL(None, use_errno=True)


def tgid(tid: int) -> int:
    """The process (thread group) of a thread."""
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(tid)


def read_bytes(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        memory.seek(address)
        return memory.read(size)


def write_bytes(pid: int, address: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
        memory.seek(address)
        memory.write(data)


def read_string(pid: int, address: int) -> bytes:
    """A NUL-terminated string (a path) of at most PATH_MAX bytes."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        memory.seek(address)
        text = b""
        while len(text) < _PATH_MAX:  # a page at a time: the string may end before a page
            chunk = memory.read(4096 - (address + len(text)) % 4096)
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                return text + chunk[:end]
            text += chunk
    raise OSError(errno.ENAMETOOLONG, "no path")


def take_descriptor(pidfd: int, fd: int) -> int:
    """A copy of descriptor `fd` of the process of `pidfd`, close-on-exec."""
    copy = _libc.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0)
    if copy < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return copy
