"""Never down, never wrong: inputs and faults that once killed the daemon or lost its books."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mountutil import DEADLINE, keyed, read, wait_until, write

from encidfs.client import Client, ControlError


def used(mnt: Path, type_name: str = "sev") -> int:
    return keyed(read(mnt / f"encids.{type_name}.stat"))["used"]


def deep_chain(mnt: Path, depth: int) -> list[int]:
    """mnt/c/c/.../c, `depth` levels with +encids at every level above the bottom; returns
    O_PATH descriptors of the levels, top first (paths that deep pass PATH_MAX)."""
    write(mnt / "cgroup.subtree_control", "+encids")
    fds = [os.open(mnt, os.O_PATH | os.O_DIRECTORY)]
    for level in range(depth):
        os.mkdir("c", dir_fd=fds[-1])
        fds.append(os.open("c", os.O_PATH | os.O_DIRECTORY, dir_fd=fds[-1]))
        if level < depth - 1:
            fd = os.open("cgroup.subtree_control", os.O_WRONLY, dir_fd=fds[-1])
            try:
                os.write(fd, b"+encids")
            finally:
                os.close(fd)
    os.close(fds[0])
    return fds[1:]


def write_at(dir_fd: int, name: str, data: str) -> None:
    fd = os.open(name, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


@pytest.mark.parametrize("release", ["holder exits", "freed over the socket"])
def test_a_deep_dying_chain_is_released_and_its_id_returns(daemon, procs, release):
    # An unprivileged delegatee's chain: a charge at the bottom, the holder moved out, the
    # chain removed; the last uncharge releases every level (it once overflowed the stack).
    mnt = daemon.mountpoint
    depth = 600
    levels = deep_chain(mnt, depth)
    parents = [os.open(mnt, os.O_PATH | os.O_DIRECTORY)] + levels[:-1]
    holder = procs.sleep()
    try:
        write_at(levels[-1], "cgroup.procs", str(holder.pid))
        with Client.connect(mount=str(mnt)) as client:
            ids = client.allocate("sev", pid=holder.pid)
            write(mnt / "cgroup.procs", str(holder.pid))
            for parent in reversed(parents):
                os.rmdir("c", dir_fd=parent)
            assert keyed(read(mnt / "cgroup.stat"))["nr_dying_descendants"] == depth
            if release == "holder exits":
                holder.kill()
            else:
                client.free(list(ids))
            wait_until(lambda: used(mnt) == 0, "the ID to be freed")
            wait_until(lambda: keyed(read(mnt / "cgroup.stat"))["nr_dying_descendants"] == 0,
                       "the dying chain to be released")
            assert client.allocate("sev", pid=os.getpid()) == ids  # back in the pool
    finally:
        for fd in {*parents, *levels}:
            os.close(fd)
    assert daemon.process.poll() is None


# -- signals and self-harm ------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM])
def test_stray_signals_do_not_stop_the_daemon(daemon, signum):
    mnt = daemon.mountpoint
    os.kill(daemon.process.pid, signum)
    wait_until(lambda: f"{signal.Signals(signum).name}: ignored" in daemon.log_text(),
               "the daemon to log the signal")
    write(mnt / "cgroup.subtree_control", "+encids")
    assert read(mnt / "cgroup.subtree_control") == "encids\n"
    assert daemon.process.poll() is None


def test_the_daemon_never_freezes_or_kills_itself(daemon, procs):
    mnt = daemon.mountpoint
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    other = procs.sleep()
    write(mnt / "a/cgroup.procs", str(daemon.process.pid))
    write(mnt / "a/cgroup.procs", str(other.pid))
    write(mnt / "a/cgroup.freeze", "1")
    wait_until(lambda: keyed(read(mnt / "a/cgroup.events"))["frozen"] == 1, "a to freeze")
    assert proc_state(other.pid) == "T" and proc_state(daemon.process.pid) != "T"
    write(mnt / "a/cgroup.freeze", "0")
    wait_until(lambda: keyed(read(mnt / "a/cgroup.events"))["frozen"] == 0, "a to thaw")
    write(mnt / "a/cgroup.kill", "1")
    assert other.wait(timeout=DEADLINE) == -signal.SIGKILL
    wait_until(lambda: pids_of(mnt / "a") == [daemon.process.pid], "the sleep to leave a")
    assert daemon.process.poll() is None


def test_clients_give_up_on_a_stopped_daemon(daemon):
    mnt = daemon.mountpoint
    path = os.getxattr(mnt, "user.encidfs.control").decode()
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ControlError) as refused:
            with Client.connect(control=path, timeout=0.5) as client:
                client.status()
        assert refused.value.errno == errno.ETIMEDOUT
        with pytest.raises(ControlError) as refused:
            Client.connect(mount=str(mnt), timeout=0.5)
        assert refused.value.errno == errno.ETIMEDOUT
        result = subprocess.run([sys.executable, "-m", "encidfs", "status", "--mount", str(mnt),
                                 "--timeout", "0.5"], capture_output=True, text=True,
                                timeout=DEADLINE)
        assert result.returncode == 1
        assert "did not answer within 0.5 s" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert time.monotonic() - started < DEADLINE
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    with Client.connect(control=path) as client:
        assert client.status()["ok"]


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def pids_of(cgroup: Path) -> list[int]:
    return [int(line) for line in read(cgroup / "cgroup.procs").splitlines()]
