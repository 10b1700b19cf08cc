"""Reading /proc/PID/stat: the one parser of it, for the daemon, its command line and its tests.

A process can be gone before the file is opened (FileNotFoundError) or between the open and
the read (ProcessLookupError: the kernel answers ESRCH); `read_stat` raises either, the state
functions answer None and False.
"""

from __future__ import annotations

from typing import NamedTuple

PROC = "/proc"


class Stat(NamedTuple):
    """The fields of /proc/PID/stat that encidfs reads (proc(5) numbers them 3, 4, 9, 14, 15
    and 22)."""

    state: str  # R, S, D, T, t, Z, X, ...
    ppid: int
    flags: int  # PF_* of the task
    utime: int  # clock ticks in user mode
    stime: int  # clock ticks in kernel mode
    start_time: int  # clock ticks since boot


def read_stat(pid: int, tid: int | None = None, proc: str = PROC) -> Stat:
    """/proc/PID/stat, or /proc/PID/task/TID/stat with `tid`."""
    path = f"{proc}/{pid}/stat" if tid is None else f"{proc}/{pid}/task/{tid}/stat"
    with open(path, "rb") as f:
        data = f.read()
    # The command name before the fields may hold anything, spaces and ')' too: the fields
    # start after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return Stat(fields[0].decode(), int(fields[1]), int(fields[6]), int(fields[11]),
                int(fields[12]), int(fields[19]))


def state_of(pid: int, tid: int | None = None, proc: str = PROC) -> str | None:
    """The state letter of a process (of its thread `tid`); None once it is gone, or where its
    stat cannot be read."""
    try:
        return read_stat(pid, tid, proc).state
    except OSError:
        return None


def alive(pid: int, tid: int | None = None, proc: str = PROC) -> bool:
    """Whether a process (its thread `tid`) is there and has not exited: a zombie has."""
    return state_of(pid, tid, proc) not in (None, "Z", "X")
