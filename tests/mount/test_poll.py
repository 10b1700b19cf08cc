"""poll(2) on a descriptor not read yet, as kernfs answers it: of->event starts behind the
node's event count, so every interface file polls POLLPRI|POLLERR until it is first read.

Checked on this machine's cgroup2 in a scratch cgroup: fresh, every file reports IN|PRI|OUT|ERR;
after a read, IN|OUT, except cgroup.procs and cgroup.threads with no member (their seq_show
never runs, so of->event does not catch up) and the write-only cgroup.kill (never read)."""

from __future__ import annotations

import os
import select

import pytest
from mountutil import write

EVERYTHING = select.POLLIN | select.POLLPRI | select.POLLOUT | select.POLLERR
NOTIFIED = EVERYTHING
QUIET = select.POLLIN | select.POLLOUT


def polled(fd: int) -> int:
    poller = select.poll()
    poller.register(fd, EVERYTHING)
    return dict(poller.poll(0)).get(fd, 0)


@pytest.fixture
def child(mnt):
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    (mnt / "a").mkdir()
    return mnt / "a"


@pytest.mark.parametrize("name", ["cgroup.events", "cgroup.stat", "cgroup.type",
                                  "cgroup.subtree_control", "misc.events",
                                  "misc.events.local", "encids.sev.events", "misc.max"])
def test_a_fresh_descriptor_polls_notified_until_it_is_read(child, name):
    fd = os.open(child / name, os.O_RDONLY)
    try:
        assert polled(fd) == NOTIFIED
        assert polled(fd) == NOTIFIED  # polling alone changes nothing
        os.read(fd, 4096)
        assert polled(fd) == QUIET
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["cgroup.procs", "cgroup.threads"])
def test_a_read_that_lists_no_member_does_not_catch_up(child, procs, name):
    fd = os.open(child / name, os.O_RDONLY)
    try:
        assert os.read(fd, 4096) == b""
        assert polled(fd) == NOTIFIED
        write(child / "cgroup.procs", str(procs.sleep().pid))
        assert os.pread(fd, 4096, 0) != b""
        assert polled(fd) == QUIET
    finally:
        os.close(fd)


def test_the_write_only_kill_file_always_polls_notified(child):
    fd = os.open(child / "cgroup.kill", os.O_WRONLY)
    try:
        assert polled(fd) == NOTIFIED
        os.write(fd, b"1")
        assert polled(fd) == NOTIFIED
    finally:
        os.close(fd)


def test_epoll_and_select_see_a_fresh_descriptor_at_once(child):
    fd = os.open(child / "cgroup.events", os.O_RDONLY)
    epoll = select.epoll()
    try:
        epoll.register(fd, select.EPOLLPRI)
        assert epoll.poll(0) == [(fd, select.EPOLLPRI | select.EPOLLERR)]
        assert select.select([], [], [fd], 0)[2] == [fd]
    finally:
        epoll.close()
        os.close(fd)
