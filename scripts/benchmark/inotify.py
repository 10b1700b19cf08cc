"""The latency of inotify's IN_MODIFY on cgroup.events after a move, encidfs beside the
kernel."""

import contextlib
import os

from . import ROOT, Skip
from .mounts import (
    MOUNT_DEADLINE,
    encidfs_argv,
    fuse_mount,
    kernel_scratch,
    returning_home,
    sleeper,
    write_file,
)
from .sampling import measure


def move_to_modify(parent, pid, iterations):
    """Microseconds from the start of a cgroup.procs write that empties one cgroup and populates
    another to the IN_MODIFY on the populated one's cgroup.events."""
    from inotify_simple import INotify, flags

    for name in ("inotify-a", "inotify-b"):
        os.mkdir(f"{parent}/{name}")
    try:
        with INotify() as inotify:
            watched = {inotify.add_watch(f"{parent}/{name}/cgroup.events", flags.MODIFY): name
                       for name in ("inotify-a", "inotify-b")}

            def move(i):
                target = ("inotify-a", "inotify-b")[i % 2]
                write_file(f"{parent}/{target}/cgroup.procs", str(pid).encode())
                while not any(watched[event.wd] == target
                              for event in inotify.read(timeout=int(MOUNT_DEADLINE * 1000))):
                    pass

            return measure(move, iterations)
    finally:
        for name in ("inotify-a", "inotify-b"):
            with contextlib.suppress(OSError):  # pid has left it before the end of move()
                os.rmdir(f"{parent}/{name}")


def inotify_latency(iterations):
    """encidfs truncates each notified file through its own mount (fuse/inotify.py): what a
    watcher waits, beside the kernel, whose cgroup_file_notify() holds a file's next
    notification until 10 ms after its last (CGROUP_FILE_NOTIFY_MIN_INTV)."""
    print(f"\ninotify: a cgroup.procs write to the IN_MODIFY on the new cgroup's cgroup.events,"
          f" microseconds over {iterations} moves")

    def encidfs():
        with fuse_mount(encidfs_argv(ROOT)) as mnt, sleeper() as pid:
            return move_to_modify(mnt, pid, iterations)

    def kernel():
        with kernel_scratch() as (mount, scratch), sleeper() as pid, returning_home(mount, pid):
            return move_to_modify(scratch, pid, iterations)

    for name, target in (("encidfs", encidfs), ("kernel", kernel)):
        try:
            median, p99 = target()
            print(f"  {name:10} median {median:8.0f}   p99 {p99:8.0f}")
        except (Skip, OSError) as e:
            print(f"  {name:10} skipped, {e}")
