"""Helpers for the mount tests: raw reads and writes that report errnos, a shell, and
tests/waiting.py's polling (DEADLINE, wait_until) to import with them.

Writes go through os.open/os.write so that an error comes back from the write(2) that caused
it (buffered Python files would only report it at close).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from waiting import DEADLINE, wait_until  # noqa: F401 (for the tests)

from encidfs.host.mount import FSTYPE, mounted_fstype  # noqa: F401 (for the tests)

NOBODY = 65534
REPO = Path(__file__).resolve().parent.parent.parent  # the checkout: encidfs importable from it
SITE = sysconfig.get_paths()["purelib"]  # where this interpreter has encidfs's dependencies


# The helpers of a script run as a test user (standard library only): write() and mkdir()
# say "OK" or the error's strerror, read() the whole file, until() polls with a deadline.
USER_HELPERS = r"""
import os, time

def write(path, text):
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as error:
        return os.strerror(error.errno)
    try:
        os.write(fd, text.encode())
        return "OK"
    except OSError as error:
        return os.strerror(error.errno)
    finally:
        os.close(fd)

def mkdir(path):
    try:
        os.mkdir(path)
        return "OK"
    except OSError as error:
        return os.strerror(error.errno)

def read(path):
    with open(path) as f:
        return f.read()

def until(condition):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
"""


def user_python() -> str:
    """An interpreter any user can execute that runs our venv's packages (with REPO and SITE on
    its path): the system's, of the same version (the venv's own may live under /root, 0700)."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        if version == str(sys.version_info[:2]):
            return system
    return sys.executable


@dataclass(frozen=True)
class User:
    """A user the tests act as (the conftest's `user` fixture makes one)."""

    uid: int
    gid: int
    group: int  # a supplementary group the user is not in unless an agent is started with it

    def setpriv(self, groups: tuple[int, ...] = ()) -> list[str]:
        """argv prefix that runs a command as the user (real, effective and saved IDs), with
        exactly `groups` as supplementary groups."""
        group_option = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", group_option]


def read(path: Path | str) -> str:
    """The whole content of a file, read with read(2) until end of file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def write(path: Path | str, data: bytes | str, offset: int | None = None,
          flags: int = 0) -> int:
    """One write(2) (or pwrite(2) at offset) of data on a fresh O_WRONLY descriptor."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        if offset is None:
            return os.write(fd, data)
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# Names for errnos that have two (errno.errorcode picks the other one).
_PREFERRED_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN"}


def outcome(action: Callable[[], object]) -> str:
    """"OK", or the errno name of the OSError that action() raised."""
    try:
        action()
    except OSError as error:
        code = error.errno
        return _PREFERRED_NAMES.get(code) or errno.errorcode.get(code, str(code))
    return "OK"


def write_result(path: Path | str, data: bytes | str, offset: int | None = None) -> str:
    """"OK" if the whole buffer was accepted, else the errno name of the failed write."""
    size = len(data.encode() if isinstance(data, str) else data)
    result: list[int] = []
    name = outcome(lambda: result.append(write(path, data, offset)))
    if name == "OK":
        assert result == [size], f"short write: {result[0]} of {size} bytes"
    return name


def sh(script: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a bash script as a user would; stdout and stderr are captured as text."""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            timeout=DEADLINE, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"bash -c {script!r} exited {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result


def keyed(text: str) -> dict[str, int]:
    """A "key value" per line file (cgroup.stat, cgroup.events, encids.*.stat) as a dict."""
    pairs = (line.split(" ") for line in text.splitlines())
    return {key: int(value) for key, value in pairs}


def events(cgroup: Path) -> dict[str, int]:
    return keyed(read(cgroup / "cgroup.events"))


def pids(cgroup: Path, name: str = "cgroup.procs") -> list[int]:
    return [int(line) for line in read(cgroup / name).splitlines()]


def nested(mnt: Path) -> tuple[Path, Path]:
    """Root enables encids; /a enables encids; /a/b exists. Returns (a, b)."""
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    write(a / "cgroup.subtree_control", "+encids")
    b = a / "b"
    b.mkdir()
    return a, b


def inotifywait_modify(path: Path, action: Callable[[], object]) -> str:
    """What inotifywait(1), watching `path` for IN_MODIFY, prints ("PATH MODIFY") once
    action() has run after its watch is in place."""
    watcher = subprocess.Popen(["inotifywait", "-e", "modify", "--format", "%w %e",
                                "-t", str(int(DEADLINE)), str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "Watches established" not in watcher.stderr.readline():
            assert watcher.poll() is None, watcher.stderr.read()
        action()
        out, _ = watcher.communicate(timeout=DEADLINE)
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 0
    return out
