"""IN_MODIFY for the changes the daemon makes by itself.

kernfs_notify() raises FS_MODIFY on a file whose content changed (`populated` or `frozen` in
cgroup.events, a controller's events counters), and systemd and the containerd cgroups library
watch for it with inotify.  FUSE has no notification that reaches inotify, but the VFS raises
FS_MODIFY for a size change made through the mount (fsnotify_change() on ATTR_SIZE), and a
truncate of an interface file is accepted and means nothing here, as on kernfs.  So each
notified file is truncated through the mount, by a thread of its own: the loop serves the
SETATTR that the truncate sends while the thread waits in it, and never waits for the thread.

Writing needs permission to write a 0444 file: CAP_DAC_OVERRIDE, which a daemon run as root
has.  A mount of a user's own is checked likewise; without the capability nothing is truncated
and `encidfs status` says so.
"""

from __future__ import annotations

import logging
import os
import threading

from ..engine.cgroup import Event
from ..files.kernfs import Kernfs
from ..mountinfo import mounted_at

log = logging.getLogger("encidfs")


class ModifyNotifier:
    """A consumer of the change bus: every file a batch notifies gets an IN_MODIFY."""

    def __init__(self, kernfs: Kernfs, mountpoint: str) -> None:
        self.kernfs = kernfs
        self.mountpoint = os.fsencode(os.path.abspath(mountpoint))
        self.touched = 0  # files truncated, for the benchmark and status
        self._dev: int | None = None
        # The files waiting (in order, each once: a change made twice before its truncate needs
        # one IN_MODIFY, as kernfs_notify() queues a node once), and the thread's wake-up.
        self._pending: dict[bytes, None] = {}
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="encidfs-inotify", daemon=True)

    @staticmethod
    def available() -> bool:
        """Whether this process may truncate read-only files (CAP_DAC_OVERRIDE)."""
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 1))  # CAP_DAC_OVERRIDE
        return False

    def start(self) -> None:
        """Once mounted: the truncates go only where this mount is, never to whatever might
        later be mounted over its mountpoint."""
        mount = mounted_at(os.fsdecode(self.mountpoint))
        self._dev = mount.device if mount else None
        self._thread.start()

    def consume(self, batch: list[Event]) -> None:
        paths = []
        for change, cg in batch:
            if isinstance(change, str):
                directory = os.fsencode(cg.path.rstrip("/"))
                paths += [self.mountpoint + directory + b"/" + name.encode()
                          for name in self.kernfs.files_notified_by(change, cg)]
        if paths:
            with self._wake:
                self._pending.update(dict.fromkeys(paths))
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                paths, self._pending = list(self._pending), {}
            try:
                if os.stat(self.mountpoint).st_dev != self._dev:
                    continue  # unmounted, or something is mounted over it
                for path in paths:
                    try:
                        os.truncate(path, 0)
                        self.touched += 1
                    except OSError as error:
                        # Gone since (ENOENT, ENODEV), or the mount is going (ENOTCONN).
                        log.debug("inotify: %s: %s", path, error)
            except OSError as error:
                log.debug("inotify: %s: %s", self.mountpoint, error)

