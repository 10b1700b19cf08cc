"""A controller registered by a module the daemon loads (--controller-module): the test-only
counting controller (tests/engine/counter.py) through a real mount."""

import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import outcome, read, wait_until, write

COUNTER = str(Path(__file__).parents[1] / "engine" / "counter.py")
OPTIONS = ("--controller-module", COUNTER, "--controllers", "encids,misc,count")
# Forks a child that sleeps, and says how it ended once it has (its exit status or signal).
FORKER = """
import os, sys
sys.stdin.readline()
child = os.fork()
if child == 0:
    os.execvp("sleep", ["sleep", "600"])
print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def counted(encidfs_factory):
    """A mount offering count, enabled at its root, with /a."""
    mount = encidfs_factory(options=OPTIONS, state=True)
    write(mount.path / "cgroup.subtree_control", "+count")
    (mount.path / "a").mkdir()
    return mount


def test_offered_and_shown(counted):
    mnt = counted.path
    assert read(mnt / "cgroup.controllers").split() == ["encids", "misc", "count"]
    assert (read(mnt / "a/count.max"), read(mnt / "a/count.current")) == ("max\n", "0\n")
    assert not (mnt / "count.max").exists()


def test_moves_are_counted_and_refused_past_the_limit(counted, procs):
    a = counted.path / "a"
    write(a / "count.max", "1")
    first, second = procs.sleep(), procs.sleep()
    write(a / "cgroup.procs", str(first.pid))
    assert read(a / "count.current") == "1\n"
    assert outcome(lambda: write(a / "cgroup.procs", str(second.pid))) == "EAGAIN"
    write(counted.path / "cgroup.procs", str(first.pid))
    write(a / "cgroup.procs", str(second.pid))
    assert read(a / "count.current") == "1\n"
    second.kill()
    wait_until(lambda: read(a / "count.current") == "0\n", "the exit to be uncounted")


def test_a_fork_past_the_limit_is_refused(counted, procs):
    a = counted.path / "a"
    write(a / "count.max", "1")
    forker = procs.start([sys.executable, "-c", FORKER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    write(a / "cgroup.procs", str(forker.pid))
    forker.stdin.write("\n")
    forker.stdin.flush()
    assert forker.stdout.readline() == f"{-9}\n"  # killed: the fork did not happen
    assert read(a / "count.current") == "1\n"


def test_status_and_the_limit_across_a_restart(counted, procs):
    a = counted.path / "a"
    write(a / "count.max", "2")
    write(a / "cgroup.procs", str(procs.sleep().pid))
    counted.restart()
    assert read(a / "count.max") == "2\n"
    status = counted.client().status()
    (entry,) = [cg for cg in status["cgroups"] if cg["path"] == "/a"]
    assert entry["count"] == {"processes": {"current": 1, "max": 2}}
    top = subprocess.run([sys.executable, "-m", "encidfs", "top", "-n", "1", "--mount",
                          str(counted.path)], capture_output=True, text=True, check=True).stdout
    (row,) = [line.split() for line in top.splitlines() if line.startswith("/a ")]
    assert row[3:6] == ["processes", "[#####.....]", "1/2"]
