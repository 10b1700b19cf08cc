"""The process that truncates files through the mount for the daemon (fuse/inotify.py).

    python -m encidfs.fuse.toucher MOUNTPOINT DEVICE

Reads NUL-terminated paths on stdin and truncates each, in batches, only while MOUNTPOINT is
still the mount with st_dev DEVICE.  It ends when stdin does (the daemon is gone).  It is a
process apart so that a truncate waiting for the daemon's answer never keeps the daemon
itself from dying: were it a thread, a daemon killed with a request read and not answered
would stay a zombie, its /dev/fuse open, the mount dead and never mounted again.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    mountpoint, device = os.fsencode(sys.argv[1]), int(sys.argv[2])
    pending = b""
    while chunk := os.read(0, 65536):
        pending += chunk
        *paths, pending = pending.split(b"\0")
        try:
            if os.stat(mountpoint).st_dev != device:
                continue  # unmounted, or something is mounted over it
        except OSError:
            continue
        for path in dict.fromkeys(paths):  # once each, in order
            try:
                os.truncate(path, 0)
            except OSError:
                pass  # gone since (ENOENT, ENODEV), or the mount is going (ENOTCONN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
