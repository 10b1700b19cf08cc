"""Fixtures of the mount tests, on the encidfs pytest plugin's (encidfs/pytest_plugin.py): every
instance is a daemon of its own on a fresh directory, unmounted in teardown whatever the test
did, and a daemon that logged an error or did not exit cleanly fails the test.

- `daemon`: a fresh default instance per test (sev=509, sev_es=99; both controllers), as the
  plugin's `Mount` (.path, .process, .log); `mnt` is its root.
- `mount_encidfs(*args, nofile=None)`: a fresh instance with command-line options.
- `cgroup(name)`: on `mnt`, enable encids at the root and make mnt/name.
- `shared_mnt` / `cg`: one instance per module and a fresh cgroup of it per test, for the
  many tests that need no untouched root (a daemon start costs ~0.25 s of CPU).
- `procs`: processes the test starts (`procs.pool()`: one whose threads come and go on order);
  killed and reaped in teardown.
- `user`: a user to act as, `second_user` another; `traversable(path)`: the directories
  above a mountpoint opened to every user for the test.
- `scratch`: a cgroup of the test's own below the root of this machine's cgroup v2 hierarchy,
  removed afterwards with whatever is in it.
- `storm`: the compiled process storm (storm.c), as `Storm`s started on order.
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mountutil import DEADLINE, NOBODY, User, events, wait_until, write

from encidfs.host.mountinfo import cgroup2_mounts
from encidfs.pytest_plugin import Mount


@pytest.fixture(scope="session", autouse=True)
def _root_and_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the mount tests need root and /dev/fuse")


@pytest.fixture
def mount_encidfs(encidfs_factory) -> Callable[..., Path]:
    """Factory: mount_encidfs(*extra_args, nofile=None) mounts a fresh instance and returns its
    root; `nofile` is the daemon's (soft, hard) limit on descriptors."""

    def mount(*extra_args: str, nofile: tuple[int, int] | None = None) -> Path:
        return encidfs_factory(options=extra_args, nofile=nofile).path

    return mount


@pytest.fixture
def daemon(encidfs_factory) -> Mount:
    """A fresh default instance, with its process and log."""
    return encidfs_factory()


@pytest.fixture
def mnt(daemon: Mount) -> Path:
    """The root of a fresh default instance (sev=509, sev_es=99)."""
    return daemon.path


@pytest.fixture(scope="module")
def shared_mnt(_encidfs_pool) -> Iterator[Path]:
    """One instance for a whole module, with encids enabled at its root.  The module's tests
    work in cgroups of their own (see `cg`), so they cannot see each other's writes; that
    saves a daemon start (~0.25 s of CPU) per test."""
    mount = _encidfs_pool.take().wait_mounted()
    try:
        write(mount.path / "cgroup.subtree_control", "+encids")
        yield mount.path
    finally:
        problems = mount.stop()
        if problems:
            pytest.fail("; ".join(problems) + f"\n--- daemon log ---\n{mount.log}",
                        pytrace=False)


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


# A process whose threads take orders: "spawn" (the main thread makes a thread), "spawn TID"
# (thread TID makes one), "exit TID"; each answers with a line.
POOL = r"""
import queue, sys, threading
orders = {}
def serve(inbox):
    while True:
        order = inbox.get()
        if order == "exit":
            return
        order()
def start():
    inbox = queue.Queue()
    ready = queue.Queue()
    thread = threading.Thread(target=lambda: (ready.put(threading.get_native_id()),
                                              serve(inbox)), daemon=True)
    thread.start()
    tid = ready.get()
    orders[tid] = (thread, inbox)
    return tid
for line in sys.stdin:
    words = line.split()
    if words == ["spawn"]:
        print(start(), flush=True)
    elif words[0] == "spawn":
        made = queue.Queue()
        orders[int(words[1])][1].put(lambda: made.put(start()))
        print(made.get(), flush=True)
    elif words[0] == "exit":
        thread, inbox = orders.pop(int(words[1]))
        inbox.put("exit")
        thread.join()
        print("ok", flush=True)
"""


class ThreadPool:
    """A process of ours whose threads come and go on order."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pid = process.pid

    def order(self, *words: object) -> str:
        self.process.stdin.write(" ".join(map(str, words)) + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def spawn(self, by: int | None = None) -> int:
        """A new thread, made by the main thread or by thread `by`; its TID."""
        return int(self.order("spawn", *([by] if by else [])))

    def exit(self, tid: int) -> None:
        assert self.order("exit", tid) == "ok"



class Processes:
    """Processes a test starts itself; all are killed and reaped in teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, **{"stdin": subprocess.DEVNULL, **kwargs})
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

    def pool(self) -> ThreadPool:
        return ThreadPool(self.start([sys.executable, "-c", POOL], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True))

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=DEADLINE)
            for stream in (process.stdin, process.stdout):
                if stream:
                    stream.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()


# -- process storms ------------------------------------------------------------------------------

class Storm:
    """A running storm.c: moved where the test wants it, then told to go."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pid = process.pid

    def go(self) -> list[int]:
        """Make the storm; return the PIDs it left alive (its daemons)."""
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        words = self.process.stdout.readline().split()
        assert words[:1] == ["done"], f"the storm failed: {words}"
        return [int(word) for word in words[1:]]

    def end(self) -> None:
        """Close its stdin: it exits, and so do its daemons."""
        self.process.stdin.close()
        self.process.wait(timeout=DEADLINE)


@pytest.fixture(scope="session")
def storm_program(tmp_path_factory) -> str:
    program = tmp_path_factory.mktemp("storm") / "storm"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(program),
                    str(Path(__file__).with_name("storm.c"))], check=True)
    return str(program)


@pytest.fixture
def storm(storm_program: str, procs: Processes) -> Callable[[str, int], Storm]:
    """storm(mode, n): a storm.c waiting for the test to say go (see storm.c for the modes)."""

    def start(mode: str, n: int) -> Storm:
        return Storm(procs.start([storm_program, mode, str(n)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True))

    return start


# -- the kernel's cgroup v2 hierarchy --------------------------------------------------------------

_scratch_names = itertools.count()


def _remove_tree(top: Path) -> None:
    """Kill what is left in a scratch cgroup and remove it, children first (no recursion)."""
    if not top.exists():
        return
    write(top / "cgroup.kill", "1")
    wait_until(lambda: events(top)["populated"] == 0, f"{top} to empty", timeout=DEADLINE)
    dirs = [top]
    for index in itertools.count():
        if index == len(dirs):
            break
        dirs += [child for child in dirs[index].iterdir() if child.is_dir()]
    for directory in reversed(dirs):
        directory.rmdir()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A cgroup of the test's own, directly below the cgroup v2 hierarchy's root."""
    roots = cgroup2_mounts()
    if not roots:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    top = Path(roots[0]) / f"encidfs-test.{os.getpid()}.{next(_scratch_names)}"
    top.mkdir()
    try:
        yield top
    finally:
        _remove_tree(top)


# -- users ------------------------------------------------------------------------------------

@pytest.fixture
def traversable() -> Iterator:
    """traversable(path): let every user traverse the directories above a mountpoint.  pytest's
    temporary directories (/tmp/pytest-of-root/pytest-N/mounts0) are 0700; o+x (no listing) is
    added to each of them for the test, and their modes are put back afterwards."""
    changed: list[tuple[Path, int]] = []

    def make(mountpoint: Path) -> Path:
        for directory in Path(mountpoint).parents:
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(directory, mode | stat.S_IXOTH)
                changed.append((directory, mode))
        return mountpoint

    try:
        yield make
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)



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


@pytest.fixture(scope="session")
def second_user(user: User) -> User:
    """Another user, for what one user may not do to another's processes: an unused UID, and
    GID the same, which setpriv needs no passwd entry for (nothing made, nothing to remove);
    its supplementary group is `user`'s."""
    taken = ({entry.pw_uid for entry in pwd.getpwall()} | {entry.gr_gid for entry in grp.getgrall()}
             | {user.group})
    uid = next(uid for uid in range(64000, 1000, -1) if uid not in taken)
    return User(uid, uid, user.group)
