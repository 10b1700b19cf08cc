"""What is mounted where, from /proc/self/mountinfo."""

from __future__ import annotations

import os
import re
from typing import NamedTuple


class Mount(NamedTuple):
    fstype: str
    device: int  # st_dev of the files in it


def mounted_at(mountpoint: str | os.PathLike) -> Mount | None:
    """The file system mounted last exactly at mountpoint (the one a path walk reaches)."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as octal
            if re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]) == target:
                major, minor = fields[2].split(":")
                found = Mount(fields[fields.index("-") + 1],
                              os.makedev(int(major), int(minor)))
    return found
