"""The targets of the file operations' tables, each a context manager yielding its operations
(name -> operation): encidfs (from a checkout, with a state file, exporting metrics, or --over a
scratch cgroup of the kernel's), the bare pyfuse3 file system, LXCFS and the kernel's cgroup2."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from . import ROOT, Skip
from .fileops import PINNED, file_ops
from .mounts import encidfs_argv, fuse_mount, kernel_scratch, returning_home, sleeper, write_file

SCRAPE_INTERVAL = 0.1  # seconds between scrapes of the --metrics target


SCRAPER = """
import sys, time, urllib.request
while True:
    time.sleep(float(sys.argv[2]))
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read()
    except OSError:
        pass
"""


@contextlib.contextmanager
def scraper(port):
    """A Prometheus server's part, in a process of its own (as a real one is): GET /metrics
    every SCRAPE_INTERVAL until the end."""
    proc = subprocess.Popen([sys.executable, "-c", SCRAPER, str(port), str(SCRAPE_INTERVAL)],
                            start_new_session=True)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encidfs_target(source=ROOT, state=False, metrics=False):
    """encidfs from `source`; with `metrics`, exporting them to a scraper."""
    @contextlib.contextmanager
    def target():
        env = {**os.environ, "PYTHONPATH": str(source)}
        port = free_port()
        options = ("--metrics", f"127.0.0.1:{port}") if metrics else ()
        with fuse_mount(encidfs_argv(source, state, options), env, source) as mnt, \
                sleeper() as pid, \
                (scraper(port) if metrics else contextlib.nullcontext()):
            yield encidfs_ops(mnt, pid)
    return target


@contextlib.contextmanager
def over_target():
    """encidfs --over a scratch cgroup of the kernel's: `read` is an emulated file, `read
    events` a kernel file passed through, mkdir and moves the kernel's."""
    with kernel_scratch("-over") as (mount, scratch):
        argv = encidfs_argv(ROOT, options=("--over", scratch))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with fuse_mount(argv, env) as mnt, sleeper() as pid, returning_home(mount, pid):
            yield encidfs_ops(mnt, pid)


def encidfs_ops(mnt, pid):
    """The file operations of an encidfs mount: encids enabled, and its bench cgroups made."""
    write_file(f"{mnt}/cgroup.subtree_control", b"+encids")
    for name in ("bench", "bench-a", "bench-b"):
        os.mkdir(f"{mnt}/{name}")
    return file_ops(f"{mnt}/bench/encids.sev.current", f"{mnt}/bench/encids.sev.max",
                    ("100", "200"), f"{mnt}/bench/d",
                    (f"{mnt}/bench-a/cgroup.procs", f"{mnt}/bench-b/cgroup.procs"), pid,
                    f"{mnt}/bench/cgroup.events")


def bare_target(timeout):
    @contextlib.contextmanager
    def target():
        bare_fs = str(ROOT / "scripts" / "bare_fs.py")
        with fuse_mount(lambda mnt: [sys.executable, bare_fs, mnt, "--timeout", timeout]) as mnt:
            yield file_ops(f"{mnt}/value", f"{mnt}/limit", ("100", "200"), f"{mnt}/d")
    return target


def lxcfs_target():
    """LXCFS (C, libfuse's threaded loop) serving proc/uptime, which it computes per read."""
    @contextlib.contextmanager
    def target():
        if shutil.which("lxcfs") is None:
            raise Skip("lxcfs is not installed")
        with tempfile.TemporaryDirectory(prefix="encidfs-bench-lxcfs-") as run:
            def argv(mnt: str) -> list[str]:
                return ["lxcfs", "--foreground", "--pidfile", f"{run}/lxcfs.pid", mnt]

            with fuse_mount(argv) as mnt:
                path = f"{mnt}/proc/uptime"
                yield {"read": ("read", path), PINNED: ("read", path)}
    return target


@contextlib.contextmanager
def kernel_target():
    """Our child moves between scratch cgroups and returns to its own at the end."""
    with kernel_scratch() as (mount, scratch):
        # misc is the upstream form of encids; pids is the next closest counter.
        with open(f"{scratch}/cgroup.controllers") as f:
            counters = [c for c in ("misc", "pids") if c in f.read().split()]
        if counters:
            write_file(f"{scratch}/cgroup.subtree_control", f"+{counters[0]}".encode())
        counter = f"{counters[0]}.current" if counters else "cgroup.events"
        print(f"kernel: scratch cgroup {scratch}, read is {counter}")
        for name in ("bench", "bench-a", "bench-b"):
            os.mkdir(f"{scratch}/{name}")
        with sleeper() as pid, returning_home(mount, pid):
            yield file_ops(f"{scratch}/bench/{counter}",
                           f"{scratch}/bench/cgroup.max.descendants", ("100", "200"),
                           f"{scratch}/bench/d",
                           (f"{scratch}/bench-a/cgroup.procs",
                            f"{scratch}/bench-b/cgroup.procs"), pid,
                           f"{scratch}/bench/cgroup.events")
