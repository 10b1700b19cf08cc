"""Fixtures that mount real encidfs instances (FUSE) and start the processes tests move around.

Every instance is a daemon of its own (`python -m encidfs mount MNT --foreground`) on a fresh
directory, waited for in /proc/self/mountinfo and unmounted in teardown whatever the test did.
Teardown also fails the test if the daemon logged a traceback (an internal error answered with
EIO) or did not exit cleanly.

- `mnt`: a fresh default instance per test (sev=509, sev_es=99); `daemon` gives its process.
- `mount_encidfs(*args)`: a fresh instance with command-line options.
- `cgroup(name)`: on `mnt`, enable encids at the root and make mnt/name.
- `shared_mnt` / `cg`: one instance per module and a fresh cgroup of it per test, for the
  many tests that need no untouched root (a daemon start costs ~0.25 s of CPU).
- `procs`: processes the test starts; killed and reaped in teardown.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import itertools
import os
import pwd
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # mountutil, whatever pytest's import mode

from mountutil import DEADLINE, FSTYPE, NOBODY, User, mounted_fstype, write  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _root_and_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the mount tests need root and /dev/fuse")


@dataclass
class Daemon:
    mountpoint: Path
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _spawn(mountpoint: Path, log: Path, extra_args: tuple[str, ...],
           nofile: tuple[int, int] | None = None) -> Daemon:
    """`nofile`: the daemon's (soft, hard) limit on descriptors, if not the inherited one."""
    mountpoint.mkdir()
    limit = None if nofile is None else (
        lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "encidfs", "mount", str(mountpoint), "--foreground",
             *extra_args],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, preexec_fn=limit)
    return Daemon(mountpoint, process, log)


def _wait_mounted(daemon: Daemon) -> Daemon:
    """Poll mountinfo until the daemon's mount shows; fail fast if the daemon exits."""
    deadline = time.monotonic() + DEADLINE
    delay = 0.002
    while mounted_fstype(daemon.mountpoint) != FSTYPE:
        if daemon.process.poll() is not None:
            pytest.fail(f"encidfs exited with {daemon.process.returncode} before mounting "
                        f"{daemon.mountpoint}:\n{daemon.log_text()}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{daemon.mountpoint} was not mounted within {DEADLINE} s:\n"
                        f"{daemon.log_text()}", pytrace=False)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return daemon


class DaemonPool:
    """Default instances started ahead of time: a daemon takes ~0.4 s to start (mostly
    imports), which overlaps with the tests that run meanwhile.  Every test still gets an
    instance of its own that nothing else has touched."""

    AHEAD = 1

    def __init__(self, base: Path) -> None:
        self.base = base
        self.counter = itertools.count()
        self.waiting: collections.deque[Daemon] = collections.deque()

    def spawn(self, extra_args: tuple[str, ...] = (),
              nofile: tuple[int, int] | None = None) -> Daemon:
        n = next(self.counter)
        return _spawn(self.base / f"mnt{n}", self.base / f"encidfs{n}.log", extra_args, nofile)

    def take(self) -> Daemon:
        """A default instance, maybe still starting (`_mounted` waits for it)."""
        daemon = self.waiting.popleft() if self.waiting else self.spawn()
        while len(self.waiting) < self.AHEAD:
            self.waiting.append(self.spawn())  # the next test's, starting meanwhile
        return daemon

    def close(self) -> None:
        while self.waiting:
            _stop(self.waiting.popleft())


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonPool]:
    daemons = DaemonPool(tmp_path_factory.mktemp("mounts"))
    try:
        yield daemons
    finally:
        daemons.close()


def _stop(daemon: Daemon) -> list[str]:
    """Unmount and reap the daemon, whatever state it is in; return what went wrong."""
    problems = []
    mountpoint = str(daemon.mountpoint)
    # One still starting would mount after we looked: wait for its mount (or its end) first.
    deadline = time.monotonic() + DEADLINE
    while (daemon.process.poll() is None and mounted_fstype(mountpoint) != FSTYPE
           and time.monotonic() < deadline):
        time.sleep(0.01)
    if mounted_fstype(mountpoint) == FSTYPE:
        result = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"umount failed: {result.stderr.strip()}")
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    try:
        daemon.process.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        problems.append("the daemon did not exit after umount; killed")
        daemon.process.kill()
        daemon.process.wait()
    if mounted_fstype(mountpoint) == FSTYPE:  # a daemon killed while mounted leaves it dead
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    if daemon.process.returncode != 0:
        problems.append(f"the daemon exited with {daemon.process.returncode}")
    if "Traceback" in daemon.log_text():
        problems.append("the daemon logged an internal error")
    return problems


@contextlib.contextmanager
def _mounted(daemon: Daemon) -> Iterator[Daemon]:
    """Hand out a started daemon once mounted; unmount and check it afterwards (also when it
    never mounted)."""
    try:
        yield _wait_mounted(daemon)
    finally:
        problems = _stop(daemon)
        if problems:
            pytest.fail("; ".join(problems) + f"\n--- daemon log ---\n{daemon.log_text()}",
                        pytrace=False)


@pytest.fixture
def mount_encidfs(pool: DaemonPool) -> Iterator[Callable[..., Path]]:
    """Factory: mount_encidfs(*extra_args, nofile=None) mounts a fresh instance and returns its
    root; `nofile` is the daemon's (soft, hard) limit on descriptors."""
    with contextlib.ExitStack() as stack:

        def mount(*extra_args: str, nofile: tuple[int, int] | None = None) -> Path:
            fresh = extra_args or nofile is not None
            daemon = pool.spawn(extra_args, nofile) if fresh else pool.take()
            return stack.enter_context(_mounted(daemon)).mountpoint

        yield mount


@pytest.fixture
def daemon(pool: DaemonPool) -> Iterator[Daemon]:
    """A fresh default instance, with its process and log."""
    with _mounted(pool.take()) as running:
        yield running


@pytest.fixture
def mnt(daemon: Daemon) -> Path:
    """The root of a fresh default instance (sev=509, sev_es=99)."""
    return daemon.mountpoint


@pytest.fixture(scope="module")
def shared_mnt(pool: DaemonPool) -> Iterator[Path]:
    """One instance for a whole module, with encids enabled at its root.  The module's tests
    work in cgroups of their own (see `cg`), so they cannot see each other's writes; that
    saves a daemon start (~0.25 s of CPU) per test."""
    with _mounted(pool.take()) as running:
        write(running.mountpoint / "cgroup.subtree_control", "+encids")
        yield running.mountpoint


_cg_names = itertools.count()


@pytest.fixture
def cg(shared_mnt: Path) -> Path:
    """A new, empty child of the shared instance's root, which enables encids for it: it has
    the limit files, and its own cgroup.subtree_control is empty."""
    path = shared_mnt / f"cg{next(_cg_names)}"
    path.mkdir()
    return path


@pytest.fixture
def cgroup(mnt: Path) -> Callable[[str], Path]:
    """cgroup(name): enable encids in the root's cgroup.subtree_control, then mkdir mnt/name."""

    def make(name: str) -> Path:
        write(mnt / "cgroup.subtree_control", "+encids")
        path = mnt / name
        path.mkdir()
        return path

    return make


class Processes:
    """Processes a test starts itself; all are killed and reaped in teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self.started.append(process)
        return process

    def sleep(self) -> subprocess.Popen:
        return self.start(["sleep", "600"])

    def threaded(self) -> tuple[subprocess.Popen, int]:
        """A Python process with a second thread; returns it and the second thread's TID."""
        code = ("import sys, threading, time\n"
                "def run():\n"
                "    print(threading.get_native_id(), flush=True)\n"
                "    time.sleep(600)\n"
                "threading.Thread(target=run, daemon=True).start()\n"
                "time.sleep(600)\n")
        process = self.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        tid = int(process.stdout.readline())
        return process, tid

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=DEADLINE)
            if process.stdout:
                process.stdout.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()


# -- users ------------------------------------------------------------------------------------

USER_NAME = "encidfs-test"
GROUP_NAME = "encidfs-test-g"


def _run(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=DEADLINE).returncode == 0


@pytest.fixture(scope="session")
def user() -> Iterator[User]:
    """A system user made for the session (encidfs-test) and a group made for it, removed at
    the end (an existing one is used as it is, and left); without useradd, nobody (65534) and an
    unused GID."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is needed to act as another user")
    made_user = made_group = False
    try:
        entry = pwd.getpwnam(USER_NAME)  # left by a session still running or one that crashed
    except KeyError:
        made_user = (shutil.which("useradd") is not None
                     and _run("useradd", "--system", "--no-create-home", USER_NAME))
        entry = pwd.getpwnam(USER_NAME) if made_user else pwd.getpwuid(NOBODY)
    try:
        group = grp.getgrnam(GROUP_NAME).gr_gid
    except KeyError:
        made_group = (shutil.which("groupadd") is not None
                      and _run("groupadd", "--system", GROUP_NAME))
        if made_group:
            group = grp.getgrnam(GROUP_NAME).gr_gid
        else:  # the kernel needs no /etc/group entry for a supplementary group
            used = {g.gr_gid for g in grp.getgrall()}
            group = next(gid for gid in range(65000, 1000, -1) if gid not in used)
    try:
        yield User(entry.pw_uid, entry.pw_gid, group)
    finally:
        if made_user:
            _run("userdel", USER_NAME)
        if made_group:
            _run("groupdel", GROUP_NAME)
