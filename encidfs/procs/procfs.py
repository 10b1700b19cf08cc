"""Reading /proc/PID/stat: the fields process tracking and the freezer look at."""

from __future__ import annotations


def stat_fields(proc: str, pid: int, tid: int | None = None) -> list[str]:
    """The fields of /proc/PID/stat (of /proc/PID/task/TID/stat with `tid`) from the state on:
    the command name before them may hold anything."""
    path = f"{proc}/{pid}/stat" if tid is None else f"{proc}/{pid}/task/{tid}/stat"
    with open(path, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].decode().split()


def thread_state(proc: str, pid: int, tid: int) -> str | None:
    """A thread's state letter (R, S, D, T, t, Z, ...); None once it is gone."""
    try:
        return stat_fields(proc, pid, tid)[0]
    except (OSError, ValueError, IndexError):
        return None
