"""What is mounted where, from /proc/self/mountinfo."""

from __future__ import annotations

import os
import re
from typing import NamedTuple


class Mount(NamedTuple):
    fstype: str
    device: int  # st_dev of the files in it


def _mounts(process: int | str = "self") -> list[tuple[str, str, Mount]]:
    """(mountpoint, root in its file system, the mount), in mount order, in the mount
    namespace of `process`."""
    found = []
    with open(f"/proc/{process}/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            major, minor = fields[2].split(":")
            found.append((_unescape(fields[4]), _unescape(fields[3]),
                          Mount(fields[fields.index("-") + 1],
                                os.makedev(int(major), int(minor)))))
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounted_at(mountpoint: str | os.PathLike) -> Mount | None:
    """The file system mounted last exactly at mountpoint (the one a path walk reaches)."""
    target = os.path.abspath(mountpoint)
    found = None
    for path, _, mount in _mounts():
        if path == target:
            found = mount
    return found


def cgroup2_mounts() -> list[str]:
    """Where the root of the cgroup2 hierarchy is mounted (its root-only files are there)."""
    return [path for path, root, mount in _mounts() if mount.fstype == "cgroup2" and root == "/"]


class Cgroup2Mount(NamedTuple):
    mountpoint: str
    root: str  # the directory of the hierarchy mounted there ("/" for all of it)


def cgroup2_mount_of(path: str) -> Cgroup2Mount | None:
    """The cgroup2 mount a real path lies in (the last mounted on the longest prefix)."""
    best: tuple[str, str, Mount] | None = None
    for mountpoint, root, mount in _mounts():
        inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(mountpoint) >= len(best[0])):
            best = (mountpoint, root, mount)
    if best is None or best[2].fstype != "cgroup2":
        return None
    return Cgroup2Mount(best[0], best[1])


def mounts_of(device: int, process: int) -> list[tuple[str, str]]:
    """Where the file system with `device` is mounted in the mount namespace of `process`:
    (mountpoint, the directory of it mounted there)."""
    return [(path, root) for path, root, mount in _mounts(process) if mount.device == device]
