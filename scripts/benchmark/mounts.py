"""What is measured, mounted: daemons on mountpoints of their own (run from a checkout, today's
or a revision's), and scratch cgroups in the kernel's cgroup2 mount; the files read and written
there, and a child process to move between cgroups."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ROOT, Skip

MOUNT_DEADLINE = 10.0  # seconds for a daemon to mount before it counts as failed
DAEMONS = {}  # mountpoint -> its daemon's PID, for pinning
LOGS = {}  # mountpoint -> its daemon's log (a file)


# The file is closed also on error or Ctrl-C: an open file keeps a lazily unmounted daemon alive.
def read_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4096)
    finally:
        os.close(fd)


def write_file(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def is_mounted(path):
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == path for line in mountinfo)


def close_files_on(mnt):
    """Close files of ours left open on mnt, which would keep its daemon alive after unmounting.

    Ctrl-C during a FUSE open raises as soon as os.open returns, before its fd is stored: the
    usual try/finally cannot close it.
    """
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(mnt + "/"):
                os.close(int(fd))


def unmount(path):
    """Unmount if mounted; lazily, so that a file left open by an interrupted run cannot stop it."""
    if not is_mounted(path):
        return False
    subprocess.run(["fusermount3", "-u", "-z", path], check=False)
    return True


@contextlib.contextmanager
def fuse_mount(argv, env=None, cwd=ROOT):
    """Run a daemon, argv(mountpoint), in `cwd` until its mount shows; unmount and reap it on
    the way out.  The mountpoint is in a temporary directory of its own, removed with whatever
    the daemon put beside it.  (`python -m` imports from its working directory first, before
    PYTHONPATH: a checkout's daemon must run in the checkout.)"""
    work = os.path.realpath(tempfile.mkdtemp(prefix="encidfs-bench-"))
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    with tempfile.TemporaryFile() as log:
        # Its own session: Ctrl-C reaches only us, and we unmount before it goes.
        proc = subprocess.Popen(argv(mnt), cwd=cwd, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + MOUNT_DEADLINE
            while not is_mounted(mnt):
                if proc.poll() is not None:
                    log.seek(0)
                    last = (log.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                    raise Skip(f"did not mount (exit status {proc.returncode}: {last})")
                if time.monotonic() > deadline:
                    raise Skip(f"did not mount within {MOUNT_DEADLINE:.0f} s")
                time.sleep(0.01)
            DAEMONS[mnt] = proc.pid
            LOGS[mnt] = log
            yield mnt
        finally:
            DAEMONS.pop(mnt, None)
            LOGS.pop(mnt, None)
            close_files_on(mnt)
            if unmount(mnt):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # a daemon exits once its mount is gone
            proc.kill()  # still starting up, or kept alive (a no-op once it has exited)
            proc.wait()
            unmount(mnt)  # it mounted just before it was killed
            os.rmdir(mnt)  # fails, leaving everything, if it is somehow still mounted
            shutil.rmtree(work)


def encidfs_argv(source, state=False, options=()):
    """The daemon's command line, from the checkout `source`; with a durable state file beside
    the mountpoint if `state`."""
    def argv(mnt):
        extra = ["--state", os.path.join(os.path.dirname(mnt), "state.db")] if state else []
        return [sys.executable, "-m", "encidfs", "mount", mnt, "--foreground", *extra,
                *options]
    return argv


@contextlib.contextmanager
def checkout(rev):
    """The tree of git revision `rev`, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="encidfs-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        yield Path(tree)


@contextlib.contextmanager
def sleeper():
    """A child process of our own to move between cgroups: the only PID ever written."""
    # Its own session keeps Ctrl-C away from it, so the finally blocks decide when it ends.
    proc = subprocess.Popen(["sleep", "infinity"], start_new_session=True)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- the kernel's cgroup2 mount -------------------------------------------------------------------

def cgroup2_mount():
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, path, fstype, *_ = line.split()
            if fstype == "cgroup2":
                return path
    raise Skip("no cgroup2 mount")


def cgroup_dir(mount, pid):
    """The directory of pid's cgroup in the cgroup2 mount."""
    with open(f"/proc/{pid}/cgroup") as lines:
        for line in lines:
            if line.startswith("0::"):
                return os.path.join(mount, line[3:].strip().lstrip("/"))
    raise Skip(f"no cgroup2 membership in /proc/{pid}/cgroup")


@contextlib.contextmanager
def kernel_scratch(suffix=""):
    """A scratch cgroup under our own, removed with every cgroup made in it."""
    mount = cgroup2_mount()
    scratch = os.path.join(cgroup_dir(mount, os.getpid()),
                           f"encidfs-bench-{os.getpid()}{suffix}")
    os.mkdir(scratch)
    try:
        yield mount, scratch
    finally:
        for path, _, _ in os.walk(scratch, topdown=False):
            os.rmdir(path)


@contextlib.contextmanager
def returning_home(mount, pid):
    """pid goes back to the cgroup it started in (if something has not killed it)."""
    home = f"{cgroup_dir(mount, pid)}/cgroup.procs"
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            write_file(home, str(pid).encode())
