"""IN_MODIFY for the changes the daemon makes by itself.

kernfs_notify() raises FS_MODIFY on a file whose content changed (`populated` or `frozen` in
cgroup.events, a controller's events counters), and systemd and the containerd cgroups library
watch for it with inotify.  FUSE has no notification that reaches inotify, but the VFS raises
FS_MODIFY for a size change made through the mount (fsnotify_change() on ATTR_SIZE), and a
truncate of an interface file is accepted and means nothing here, as on kernfs.  So each
notified file is truncated through the mount by a process of its own (fuse/toucher.py): the
event loop serves the SETATTR that the truncate sends and never waits for that process, and
the daemon never waits in a request to itself.

As cgroup_file_notify() does, a file is notified at most once in NOTIFY_MIN_INTERVAL: a change
within that time of the file's last notification is held until the time is up, and all the
changes held meanwhile get one IN_MODIFY then.  A watcher learns of every change within 10 ms,
and a burst of moves costs a few truncates, not two each.

Writing needs permission to write a 0444 file: CAP_DAC_OVERRIDE, which a daemon run as root
has.  A mount of a user's own is checked likewise; without the capability nothing is truncated
and `encidfs status` says so.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import trio

from ..engine.cgroup import Cgroup
from ..engine.events import Event
from ..files.kernfs import Kernfs
from ..host.mountinfo import mounted_at

log = logging.getLogger("encidfs")

# CGROUP_FILE_NOTIFY_MIN_INTV: "let's not notify more than 100 times per second" (seconds).
NOTIFY_MIN_INTERVAL = 0.01


class ModifyNotifier:
    """A consumer of the event bus: every file a batch notifies gets an IN_MODIFY."""

    def __init__(self, kernfs: Kernfs, mountpoint: str) -> None:
        self.kernfs = kernfs
        self.mountpoint = os.path.abspath(mountpoint)
        # The changes waiting (in order, each once: a change made twice before its truncate
        # needs one IN_MODIFY, as kernfs_notify() queues a node once); bounded by the files
        # there are.  Their paths are made by run(), after the reply to the request.
        self._pending: dict[tuple[str, Cgroup], None] = {}
        self._wake = trio.Event()
        # When each file was last truncated, oldest first, kept for NOTIFY_MIN_INTERVAL; and
        # when each file held back is due.  Both are bounded by the files there are.
        self._notified_at: dict[bytes, float] = {}
        self._held: dict[bytes, float] = {}

    @staticmethod
    def available() -> bool:
        """Whether this process may truncate read-only files (CAP_DAC_OVERRIDE)."""
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 1))  # CAP_DAC_OVERRIDE
        return False

    def consume(self, batch: list[Event]) -> None:
        for change, cg in batch:
            if isinstance(change, str):
                self._pending[change, cg] = None
        if self._pending:
            self._wake.set()

    def _paths(self, changes: list[tuple[str, Cgroup]]) -> list[bytes]:
        prefix = os.fsencode(self.mountpoint)
        paths: dict[bytes, None] = {}
        for change, cg in changes:
            directory = prefix + os.fsencode(cg.path.rstrip("/")) + b"/"
            paths.update(dict.fromkeys(directory + name.encode()
                                       for name in self.kernfs.files_notified_by(change, cg)))
        return list(paths)

    def _due(self, now: float) -> list[bytes]:
        """The files to truncate now: the pending ones not notified within the interval, and
        the held ones whose time has come.  The others are held."""
        changes, self._pending = list(self._pending), {}
        due = []
        for path in self._paths(changes):
            last = self._notified_at.get(path)
            if last is not None and now < last + NOTIFY_MIN_INTERVAL:
                self._held.setdefault(path, last + NOTIFY_MIN_INTERVAL)
            elif path not in self._held:
                due.append(path)
        for path, at in list(self._held.items()):
            if at <= now:
                del self._held[path]
                due.append(path)
        for path in due:
            self._notified_at.pop(path, None)  # to the end: the dict stays oldest first
            self._notified_at[path] = now
        while self._notified_at:
            path, at = next(iter(self._notified_at.items()))
            if at + NOTIFY_MIN_INTERVAL > now:
                break
            del self._notified_at[path]
        return due

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Once mounted, for the daemon's lifetime: hand the pending files to the toucher,
        started again if it ends (started once the first toucher is, so that the mount is
        said ready with its notifications).  The truncates go only where this mount is, never
        to whatever might later be mounted over its mountpoint."""
        mount = mounted_at(self.mountpoint)
        if mount is None:
            task_status.started()
            return
        started = task_status.started
        while True:
            toucher = await trio.lowlevel.open_process(
                [sys.executable, "-m", "encidfs.fuse.toucher", self.mountpoint,
                 str(mount.device)], stdin=subprocess.PIPE)
            started()
            started = trio.TASK_STATUS_IGNORED.started  # a toucher started again says nothing
            try:
                while True:
                    with trio.move_on_at(min(self._held.values(), default=math.inf)):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
                    paths = self._due(trio.current_time())
                    if not paths:
                        continue
                    assert toucher.stdin is not None
                    await toucher.stdin.send_all(b"".join(path + b"\0" for path in paths))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("inotify: the toucher process ended (%s); starting it again",
                            toucher.returncode)
                await trio.sleep(1)
            finally:
                with trio.CancelScope(shield=True):
                    toucher.kill()
                    await toucher.wait()
