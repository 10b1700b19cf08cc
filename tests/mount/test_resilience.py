"""Never down, never wrong: inputs and faults that once killed the daemon or lost its books."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mountutil import keyed, read, wait_until, write

from encidfs.client import Client


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
