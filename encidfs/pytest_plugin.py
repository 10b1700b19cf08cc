"""A pytest plugin (installed with encidfs, entry point `pytest11`): fresh encidfs mounts for
the tests of software that manages cgroups and encryption IDs, as root or as any user.

    def test_a_limit_refuses(encidfs):
        (encidfs.path / "cgroup.subtree_control").write_text("+encids")
        (encidfs.path / "vm").mkdir()
        (encidfs.path / "vm" / "encids.sev.max").write_text("1")
        vm = encidfs.run("sleep", "600", cgroup="/vm")          # holds one sev ID
        with pytest.raises(ControlError):
            encidfs.client().allocate("sev", pid=vm.pid)         # over the limit
        with pytest.raises(ControlError) as refused:             # .errno, .type, .cgroup
            encidfs.run("sleep", "600", cgroup="/vm")            # refused: it never starts

    @pytest.mark.encidfs(capacity={"sev": 4, "sev_es": 2}, controllers=["misc"], state=True)
    def test_on_a_small_host(encidfs): ...

    @pytest.mark.parametrize("kernel", ["5.14", "6.1", None])     # RHEL 9, Debian 12, newest
    def test_on_the_kernels_of_our_users(encidfs_factory, kernel):
        mount = encidfs_factory(kernel_interface=kernel)         # misc's files of that kernel

    def test_across_a_restart(encidfs_factory):
        mount = encidfs_factory(state=True)
        mount.restart()                                          # the state is kept

A mount has sev=509 and sev_es=99 on every machine (the host's own are not detected) unless
`capacity=` says otherwise.  Every mount is unmounted after its test, whatever happened; a
daemon that died or logged an error fails the test, with its last log lines in the report.
Where FUSE cannot be used, the test errors with one line saying what is missing.
"""

from __future__ import annotations

import collections
import itertools
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pluggy
import pytest

from .client import Client
from .host.mount import FSTYPE, fuse_problem, mounted_fstype, unmount

MOUNT_DEADLINE = 10.0  # seconds for a daemon to mount, or to stop
LOG_LINES = 20  # of the daemon's log, in a failing test's report

# What Mount.run starts: it waits to be told (a byte on descriptor argv[1]) that its IDs are
# charged to it, then becomes the command, so that the IDs live exactly as long as the command,
# as with `encidfs run`; the plugin asks for them itself, so that a refusal is the client's
# ControlError.  Untold (the pipe closed), it exits.
_EXEC_WHEN_TOLD = """
import os, sys
told = int(sys.argv[1])
go = os.read(told, 1)
os.close(told)
if go:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as error:
        print(f"encidfs: {sys.argv[2]}: {error.strerror}", file=sys.stderr)
        sys.exit(127)
sys.exit(1)
"""


class Mount:
    """One encidfs mount and its daemon (in the foreground, without a supervisor)."""

    def __init__(self, path: Path, log_path: Path, options: tuple[str, ...],
                 nofile: tuple[int, int] | None = None) -> None:
        self.path = path
        self.log_path = log_path
        self.options = options
        self._nofile = nofile
        self.process: subprocess.Popen = self._spawn()

    @property
    def log(self) -> str:
        """Everything the daemon logged so far (across restarts)."""
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 5.0) -> Client:
        """A connected client of this mount's control socket (close it, or use `with`)."""
        return Client.connect(mount=str(self.path), timeout=timeout)

    def run(self, *argv: str, type: str = "sev", count: int = 1, cgroup: str | None = None,
            guest: str | None = None, **popen: object) -> subprocess.Popen:
        """Start argv as `encidfs run` does: moved into `cgroup` (a path from the mount's root)
        if given, holding `count` IDs of `type` (for `guest`s: "snp" with sev_es; by default
        the type's own) for as long as it runs.  Returns once it holds
        them.  A refusal raises the client's ControlError (.errno, .type, and for a limit or
        the capacity .cgroup and .controller), and argv does not run."""
        told, tell = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _EXEC_WHEN_TOLD, str(told), *argv],
                pass_fds=(*popen.pop("pass_fds", ()), told),  # type: ignore[misc]
                **popen)  # type: ignore[call-overload]
        except BaseException:
            os.close(tell)
            raise
        finally:
            os.close(told)
        try:
            if cgroup is not None:
                (self.path / cgroup.strip("/") / "cgroup.procs").write_text(str(process.pid))
            with self.client() as client:
                client.allocate(type, count, pid=process.pid, guest=guest)
        except BaseException:
            os.close(tell)  # untold: it exits without running argv
            process.wait()
            raise
        os.write(tell, b"x")
        os.close(tell)
        return process

    def exec(self, *argv: str, mounts: bool = False, proc_cgroup: bool = False,
             **run: object) -> subprocess.CompletedProcess:
        """Run argv (to completion) with this mount as its /sys/fs/cgroup, in a mount namespace
        of its own, statfs(2) there answering cgroup2 (see `encidfs exec`); with `mounts`, the
        mount tables say cgroup2 too; with `proc_cgroup`, /proc/PID/cgroup names the cgroups
        of this mount."""
        options = [*(["--mounts"] if mounts else []),
                   *(["--proc-cgroup"] if proc_cgroup else [])]
        return subprocess.run([sys.executable, "-m", "encidfs", "exec", "--mount",
                               str(self.path), *options, "--", *argv],
                              **run)  # type: ignore[call-overload]

    def restart(self) -> None:
        """Kill the daemon (-9) and mount again: the state comes back from its journal."""
        self.process.kill()
        self.process.wait()
        unmount(self.path, lazy=True)  # the dead mount
        self.process = self._spawn()
        self.wait_mounted()

    # -- the daemon ---------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen:
        self.path.mkdir(exist_ok=True)
        nofile = self._nofile
        limit = None if nofile is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
        # An empty host to detect capacities on: the same defaults on every machine, unless
        # the test gives its own.
        host = self.path.parent / "host"
        host.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "encidfs", "mount", str(self.path), "--foreground",
                 *self.options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=limit,
                env={**os.environ, "ENCIDFS_HOST_ROOT": str(host)})

    def wait_mounted(self) -> Mount:
        deadline = time.monotonic() + MOUNT_DEADLINE
        delay = 0.002
        while mounted_fstype(self.path) != FSTYPE:
            if self.process.poll() is not None:
                pytest.fail(f"encidfs exited with {self.process.returncode} before mounting "
                            f"{self.path}:\n{self._tail()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"{self.path} was not mounted within {MOUNT_DEADLINE} s:\n"
                            f"{self._tail()}", pytrace=False)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self

    def stop(self) -> list[str]:
        """Unmount and reap the daemon, whatever state it is in; return what went wrong."""
        problems = []
        # One still starting would mount after we looked: wait for its mount (or its end).
        deadline = time.monotonic() + MOUNT_DEADLINE
        while (self.process.poll() is None and mounted_fstype(self.path) != FSTYPE
               and time.monotonic() < deadline):
            time.sleep(0.01)
        if self.process.poll() is not None and self.process.returncode != 0:
            problems.append(f"the daemon exited with {self.process.returncode}")
        if mounted_fstype(self.path) == FSTYPE and self.process.poll() is None:
            result = unmount(self.path)
            if result.returncode != 0:
                problems.append(f"unmounting failed: {result.stderr.strip()}")
        try:
            status = self.process.wait(timeout=MOUNT_DEADLINE)
            if status != 0 and not problems:
                problems.append(f"the daemon exited with {status}")
        except subprocess.TimeoutExpired:
            problems.append("the daemon did not exit after unmounting; killed")
            self.process.kill()
            self.process.wait()
        if mounted_fstype(self.path) == FSTYPE:  # a daemon that died leaves its mount dead
            unmount(self.path, lazy=True)
        if "Traceback" in self.log or " ERROR " in self.log:
            problems.append("the daemon logged an error")
        return problems

    def _tail(self) -> str:
        return "\n".join(self.log.splitlines()[-LOG_LINES:])


class _Pool:
    """Default mounts started ahead of time: a daemon takes ~0.4 s to start (mostly imports),
    which overlaps with the test that runs meanwhile.  Each test still gets a mount of its own
    that nothing else has touched.  `common` options (pytest's --encidfs-option) come first on
    every daemon's command line, so that a test's own take precedence."""

    AHEAD = 1

    def __init__(self, base: Path, common: tuple[str, ...] = ()) -> None:
        self.base = base
        self.common = common
        self._names = itertools.count()
        self._waiting: collections.deque[Mount] = collections.deque()

    def new(self, options: tuple[str, ...] = (), nofile: tuple[int, int] | None = None) -> Mount:
        n = next(self._names)
        return Mount(self.base / f"mnt{n}", self.base / f"encidfs{n}.log",
                     (*self.common, *options), nofile)

    def take(self) -> Mount:
        mount = self._waiting.popleft() if self._waiting else self.new()
        while len(self._waiting) < self.AHEAD:
            self._waiting.append(self.new())
        return mount

    def close(self) -> None:
        while self._waiting:
            self._waiting.popleft().stop()


def _options(capacity: dict[str, int] | None = None, controllers: list[str] | None = None,
             state: bool | str | os.PathLike = False, options: tuple[str, ...] = (),
             base: Path | None = None, kernel_interface: str | None = None) -> tuple[str, ...]:
    """The daemon's command line for the fixture's keywords."""
    argv = [arg for name, count in (capacity or {}).items()
            for arg in ("--capacity", f"{name}={count}")]
    if controllers is not None:
        argv += ["--controllers", ",".join(controllers)]
    if kernel_interface is not None:
        argv += ["--kernel-interface", kernel_interface]
    if state:
        assert base is not None
        argv += ["--state", str(base / "state.db") if state is True else os.fspath(state)]
    return (*argv, *options)


# -- fixtures -------------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--encidfs-option", action="append", default=[], metavar="OPTION",
                     help="an option of `encidfs mount` for every daemon the encidfs fixtures "
                          "start, before the test's own (repeatable; e.g. "
                          "--encidfs-option=--tracking=scan)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "encidfs(capacity=None, controllers=None, state=False, options=(), "
        "kernel_interface=None): the mount the `encidfs` fixture makes for this test "
        "(kernel_interface: the misc files of that kernel, e.g. \"6.1\")")


@pytest.fixture(scope="session")
def _encidfs_pool(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
                  ) -> Iterator[_Pool]:
    pool = _Pool(tmp_path_factory.mktemp("encidfs"),
                 tuple(pytestconfig.getoption("encidfs_option")))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def encidfs_factory(_encidfs_pool: _Pool, tmp_path: Path, request: pytest.FixtureRequest
                    ) -> Iterator[Callable[..., Mount]]:
    """encidfs_factory(capacity=..., controllers=[...], state=False, options=(...),
    kernel_interface=None) mounts a fresh encidfs and returns its `Mount`; every one is
    unmounted after the test."""
    problem = fuse_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    mounts: list[Mount] = []
    counter = itertools.count()

    def factory(capacity: dict[str, int] | None = None, controllers: list[str] | None = None,
                state: bool | str | os.PathLike = False, options: tuple[str, ...] = (),
                nofile: tuple[int, int] | None = None,
                kernel_interface: str | None = None) -> Mount:
        """`nofile`: the daemon's (soft, hard) limit on descriptors, if not the inherited;
        `kernel_interface`: the kernel whose misc files the mount shows (None: the newest)."""
        state_dir = tmp_path / f"encidfs-state{next(counter)}"
        if state is True:
            state_dir.mkdir()
        argv = _options(capacity, controllers, state, tuple(options), state_dir,
                        kernel_interface)
        fresh = argv or nofile is not None
        mount = _encidfs_pool.new(argv, nofile) if fresh else _encidfs_pool.take()
        mounts.append(mount)
        return mount.wait_mounted()

    request.node._encidfs_mounts = mounts  # for the report of a failing test
    try:
        yield factory
    finally:
        problems = [f"{mount.path}: {problem}" for mount in mounts for problem in mount.stop()]
        if problems:
            tails = "\n".join(f"--- {mount.path} ---\n{mount._tail()}" for mount in mounts)
            pytest.fail("; ".join(problems) + f"\n{tails}", pytrace=False)


@pytest.fixture
def encidfs(encidfs_factory: Callable[..., Mount], request: pytest.FixtureRequest) -> Mount:
    """A fresh encidfs mount in a temporary directory, as `@pytest.mark.encidfs(...)` says
    (by default: sev with 509 IDs, sev_es with 99, both controllers, no state file, the
    newest kernel's misc files)."""
    marker = request.node.get_closest_marker("encidfs")
    return encidfs_factory(**(marker.kwargs if marker else {}))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo
                              ) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for mount in getattr(item, "_encidfs_mounts", []):
            report.sections.append((f"encidfs daemon log ({mount.path})", mount._tail()))

