"""Mounting helpers the command line and the pytest plugin share: whether FUSE can be used here,
what is mounted at a path, and unmounting.  They need none of the daemon's modules, so that the
plugin loads in a few milliseconds."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Sequence

from .mountinfo import mounted_at

FSTYPE = "fuse.encidfs"
BUSY_TIMEOUT = 1.0  # seconds to try again an unmount that is busy


def fuse_problem(options: Sequence[str] = ()) -> str | None:
    """Why this user cannot mount FUSE here, in a line, or None."""
    if not os.path.exists("/dev/fuse"):
        return ("FUSE is not available: /dev/fuse is missing (modprobe fuse; in a container, "
                "--device /dev/fuse --cap-add SYS_ADMIN)")
    if os.geteuid() == 0:
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "FUSE is not available: /dev/fuse cannot be opened"
        return None
    if shutil.which("fusermount3") is None:
        return "FUSE is not available: fusermount3 is not installed (package fuse3)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):  # fusermount3 opens it as the user
        return (f"FUSE is not available to uid {os.geteuid()}: /dev/fuse is mode "
                f"{stat.S_IMODE(os.stat('/dev/fuse').st_mode):04o} (it must be 0666, as on "
                "most hosts; in a container, --device /dev/fuse --cap-add SYS_ADMIN)")
    if "allow_other" in options and not _user_allow_other():
        return ("-o allow_other needs 'user_allow_other' in /etc/fuse.conf (root may mount "
                "with it regardless)")
    return None


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as conf:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def unmount(mountpoint: str | os.PathLike, lazy: bool = False) -> subprocess.CompletedProcess:
    """umount(8), or fusermount3 for a user; tried again for a moment while the mount is busy,
    which the daemon's own truncates (fuse/inotify.py) make it for an instant at a time."""
    if os.geteuid() == 0:
        command = ["umount", *(["-l"] if lazy else []), os.fspath(mountpoint)]
    else:
        command = ["fusermount3", "-u", *(["-z"] if lazy else []), os.fspath(mountpoint)]
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0 or "busy" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(0.01)


def mounted_fstype(mountpoint: str | os.PathLike) -> str | None:
    """The type of the file system mounted last exactly at mountpoint."""
    mount = mounted_at(mountpoint)
    return mount.fstype if mount else None
