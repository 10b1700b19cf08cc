"""Threaded subtrees through the mount, each behaviour checked first on this machine's cgroup2
in scratch cgroups of our own (with processes we started): cgroup.type and its transitions,
threads of one process in different cgroups, cgroup.procs and cgroup.threads at the thread root
and below, thread creation and exit, kill and freeze, charges, the durable state."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from mountutil import read, wait_until, write

from encidfs.client import Client


def errno_of(call) -> str:
    try:
        call()
    except OSError as error:
        return "EOPNOTSUPP" if error.errno == errno.EOPNOTSUPP else errno.errorcode[error.errno]
    return "OK"


def tids(path: Path) -> list[int]:
    return sorted(int(line) for line in read(path).split())


def types(*cgroups: Path) -> list[str]:
    return [read(cg / "cgroup.type").strip() for cg in cgroups]


@pytest.fixture
def subtree(mnt):
    """p with children a and b, and x below a."""
    p = mnt / "p"
    for cg in (p, p / "a", p / "b", p / "a" / "x"):
        cg.mkdir()
    return p, p / "a", p / "b", p / "a" / "x"


def test_cgroup_type_transitions_and_their_errno(subtree):
    p, a, b, x = subtree
    assert types(p, a, b, x) == ["domain"] * 4
    assert errno_of(lambda: write(a / "cgroup.type", "domain")) == "EINVAL"
    assert errno_of(lambda: write(a / "cgroup.type", "\n")) == "EINVAL"
    write(a / "cgroup.type", " threaded \n")
    assert types(p, a, b, x) == ["domain threaded", "threaded", "domain invalid",
                                 "domain invalid"]
    write(a / "cgroup.type", "threaded")  # already threaded
    assert errno_of(lambda: write(a / "cgroup.type", "domain")) == "EINVAL"  # no way back
    (b / "y").mkdir()
    assert types(b / "y") == ["domain invalid"]
    assert errno_of(lambda: write(b / "y" / "cgroup.type", "threaded")) == "EOPNOTSUPP"
    write(x / "cgroup.type", "threaded")
    (x / "z").mkdir()  # a new cgroup in a threaded one
    assert types(x, x / "z") == ["threaded", "domain invalid"]
    write(b / "cgroup.type", "threaded")
    assert types(b, b / "y") == ["threaded", "domain invalid"]


def test_the_thread_root_becomes_a_domain_when_its_last_threaded_child_goes(subtree):
    p, a, b, x = subtree
    x.rmdir()
    write(a / "cgroup.type", "threaded")
    a.rmdir()
    assert types(p, b) == ["domain", "domain"]


def test_a_populated_cgroup_cannot_turn_threaded_nor_its_parent_be_a_thread_root(mnt, procs):
    r = mnt / "r"
    for cg in (r, r / "p", r / "q"):
        cg.mkdir()
    sleeper = procs.sleep()
    write(r / "p" / "cgroup.procs", str(sleeper.pid))
    assert errno_of(lambda: write(r / "p" / "cgroup.type", "threaded")) == "EOPNOTSUPP"
    assert errno_of(lambda: write(r / "q" / "cgroup.type", "threaded")) == "EOPNOTSUPP"
    write(mnt / "cgroup.procs", str(sleeper.pid))
    write(r / "q" / "cgroup.type", "threaded")
    assert types(r, r / "p", r / "q") == ["domain threaded", "domain invalid", "threaded"]
    # Nothing moves into a domain invalid cgroup, and it has nothing to list.
    assert errno_of(lambda: write(r / "p" / "cgroup.procs", str(sleeper.pid))) == "EOPNOTSUPP"
    assert errno_of(lambda: write(r / "p" / "cgroup.threads", str(sleeper.pid))) == "EOPNOTSUPP"
    assert read(r / "p" / "cgroup.procs") == ""


def test_threads_of_one_process_in_different_cgroups_of_a_threaded_subtree(mnt, subtree,
                                                                          procs):
    p, a, b, x = subtree
    write(a / "cgroup.type", "threaded")
    write(x / "cgroup.type", "threaded")
    pool = procs.pool()
    t1, t2 = pool.spawn(), pool.spawn()
    write(p / "cgroup.procs", str(pool.pid))  # a thread root may hold processes
    write(a / "cgroup.threads", str(t1))
    write(x / "cgroup.threads", str(t2))
    assert [tids(cg / "cgroup.threads") for cg in (p, a, x)] == [[pool.pid], [t1], [t2]]
    # The thread root lists the processes of its whole subtree; a threaded cgroup none.
    assert read(p / "cgroup.procs") == f"{pool.pid}\n"
    assert errno_of(lambda: read(a / "cgroup.procs")) == "EOPNOTSUPP"
    assert errno_of(lambda: read(x / "cgroup.procs")) == "EOPNOTSUPP"
    assert [read(cg / "cgroup.events") for cg in (a, x)] == ["populated 1\nfrozen 0\n"] * 2
    # Threads move only within their threaded subtree.
    assert errno_of(lambda: write(mnt / "cgroup.threads", str(t1))) == "EOPNOTSUPP"
    assert errno_of(lambda: write(b / "cgroup.threads", str(t1))) == "EOPNOTSUPP"
    # A process move takes every thread, out of the subtree and back into it.
    (mnt / "q").mkdir()
    write(mnt / "q" / "cgroup.procs", str(pool.pid))
    assert tids(mnt / "q" / "cgroup.threads") == sorted([pool.pid, t1, t2])
    assert [tids(cg / "cgroup.threads") for cg in (p, a, x)] == [[], [], []]
    assert read(p / "cgroup.events") == "populated 0\nfrozen 0\n"
    assert errno_of(lambda: write(a / "cgroup.threads", str(t1))) == "EOPNOTSUPP"
    write(x / "cgroup.procs", str(t1))  # a TID names its process
    assert tids(x / "cgroup.threads") == sorted([pool.pid, t1, t2])
    assert read(p / "cgroup.procs") == f"{pool.pid}\n" and read(p / "cgroup.threads") == ""


@pytest.mark.parametrize("tracking", ["auto", "scan"])
def test_a_new_thread_starts_in_its_creators_cgroup_and_an_exit_leaves_at_once(
        mount_encidfs, procs, tracking):
    p = mount_encidfs("--tracking", tracking) / "p"
    a = p / "a"
    p.mkdir()
    a.mkdir()
    write(a / "cgroup.type", "threaded")
    pool = procs.pool()
    worker = pool.spawn()
    write(p / "cgroup.procs", str(pool.pid))
    write(a / "cgroup.threads", str(worker))
    made = pool.spawn()  # by the main thread, in p
    assert tids(p / "cgroup.threads") == sorted([pool.pid, made])
    write(a / "cgroup.threads", str(pool.pid))
    made_in_a = pool.spawn()  # the main thread is in a now
    assert tids(a / "cgroup.threads") == sorted([pool.pid, worker, made_in_a])
    pool.exit(made)  # p's last thread
    wait_until(lambda: read(p / "cgroup.threads") == "", "the exited thread to leave")
    assert read(p / "cgroup.procs") == f"{pool.pid}\n"  # the process is the subtree's
    pool.exit(worker)
    pool.exit(made_in_a)
    assert tids(a / "cgroup.threads") == [pool.pid]


def test_kill_and_freeze_in_a_threaded_subtree(subtree, procs):
    p, a, b, x = subtree
    write(a / "cgroup.type", "threaded")
    pool = procs.pool()
    worker = pool.spawn()
    write(p / "cgroup.procs", str(pool.pid))
    write(a / "cgroup.threads", str(worker))
    assert errno_of(lambda: write(a / "cgroup.kill", "1")) == "EOPNOTSUPP"
    write(a / "cgroup.freeze", "1")
    wait_until(lambda: read(a / "cgroup.events") == "populated 1\nfrozen 1\n", "frozen")
    write(a / "cgroup.freeze", "0")
    wait_until(lambda: read(a / "cgroup.events") == "populated 1\nfrozen 0\n", "thawed")
    write(p / "cgroup.kill", "1")  # the thread root kills the processes of its subtree
    assert pool.process.wait(timeout=10) == -9
    wait_until(lambda: read(p / "cgroup.events") == "populated 0\nfrozen 0\n", "emptied")
    assert read(a / "cgroup.threads") == ""


def test_domain_controllers_stay_out_of_a_threaded_subtree_and_charges_land_at_its_domain(
        mnt, procs):
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    p = mnt / "p"
    p.mkdir()
    (p / "a").mkdir()
    write(p / "a" / "cgroup.type", "threaded")
    assert read(p / "a" / "cgroup.controllers") == ""
    assert not (p / "a" / "encids.sev.max").exists()
    assert errno_of(lambda: write(p / "cgroup.subtree_control", "+encids")) == "EOPNOTSUPP"
    assert errno_of(lambda: write(p / "a" / "cgroup.subtree_control", "+encids")) == "ENOENT"
    pool = procs.pool()
    worker = pool.spawn()
    write(p / "cgroup.procs", str(pool.pid))
    write(p / "a" / "cgroup.threads", str(worker))
    write(p / "a" / "cgroup.threads", str(pool.pid))  # every thread in the threaded cgroup
    with Client.connect(mount=str(mnt)) as client:
        client.allocate("sev", pid=worker)
    assert read(p / "encids.sev.current") == "1\n"
    assert read(p / "misc.current") == "sev 1\nsev_es 0\n"


def test_a_threaded_child_of_the_root_takes_threads_of_processes_at_the_root(mnt, procs):
    t = mnt / "t"
    t.mkdir()
    write(t / "cgroup.type", "threaded")
    pool = procs.pool()
    worker = pool.spawn()
    write(t / "cgroup.threads", str(worker))
    assert tids(t / "cgroup.threads") == [worker]
    assert str(pool.pid) in read(mnt / "cgroup.procs").split()
    root_threads = tids(mnt / "cgroup.threads")
    assert pool.pid in root_threads and worker not in root_threads
    write(mnt / "cgroup.threads", str(worker))
    assert read(t / "cgroup.events") == "populated 0\nfrozen 0\n"
