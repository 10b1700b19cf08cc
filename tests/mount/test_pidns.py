"""PIDs are the caller's: a process in a PID namespace of its own (a container) names processes
by its namespace's PIDs, and is shown them so, as the kernel reads and prints them
(find_task_by_vpid(), task_pid_vnr(): 0 for a process outside the reader's namespace).

The container side is a Python script run with `unshare --fork --pid --mount-proc`: it is PID 1
there, does what it is told, and prints what it saw as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from mountutil import DEADLINE, REPO, events, pids, wait_until, write

from encidfs.client import Client

CONTAINER = textwrap.dedent("""
    import errno, json, os, subprocess, sys
    sys.path.insert(0, sys.argv[2])
    from encidfs.client import Client, ControlError
    mnt = sys.argv[1]

    def write(path, text):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
            return "OK"
        except OSError as error:
            return errno.errorcode[error.errno]
        finally:
            os.close(fd)

    def listed(path):
        with open(path) as f:
            return [int(line) for line in f.read().split()]

    seen = {"me": os.getpid()}
    child = subprocess.Popen(["sleep", "600"])
    seen["child"] = child.pid
    seen["write 1"] = write(f"{mnt}/b/cgroup.procs", "1")
    seen["write child"] = write(f"{mnt}/b/cgroup.procs", str(child.pid))
    seen["write host"] = write(f"{mnt}/b/cgroup.procs", sys.argv[3])
    seen["b"] = listed(f"{mnt}/b/cgroup.procs")
    seen["a"] = listed(f"{mnt}/a/cgroup.procs")
    seen["b threads"] = listed(f"{mnt}/b/cgroup.threads")
    with Client.connect(mount=mnt) as client:
        seen["allocated"] = client.allocate("sev", pid=child.pid)
        try:
            client.allocate("sev", pid=int(sys.argv[3]))
        except ControlError as error:
            seen["allocate host"] = errno.errorcode[error.errno]
        status = client.status()
        seen["status b"] = next(c["procs"] for c in status["cgroups"] if c["path"] == "/b")
        seen["status a"] = next(c["procs"] for c in status["cgroups"] if c["path"] == "/a")
        seen["holders"] = [h["pid"] for h in status["holders"]]
    print(json.dumps(seen), flush=True)
    sys.stdin.read()  # until the test has looked
""")


@pytest.fixture
def container(mnt, procs):
    """Runs CONTAINER in a new PID namespace, next to a host process in /a; returns what it
    saw, the host process, and the container's process."""
    if subprocess.run(["unshare", "--fork", "--pid", "true"]).returncode != 0:
        pytest.skip("unshare --pid is not available here")
    write(mnt / "cgroup.subtree_control", "+encids")
    for name in ("a", "b"):
        (mnt / name).mkdir()
    host = procs.sleep()
    write(mnt / "a/cgroup.procs", str(host.pid))
    inside = procs.start(["unshare", "--fork", "--pid", "--mount-proc", "--kill-child",
                          sys.executable, "-c", CONTAINER, str(mnt), str(REPO), str(host.pid)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = json.loads(inside.stdout.readline())
    return seen, host, inside


def test_a_container_names_and_sees_its_own_pids(mnt, container):
    seen, host, _ = container
    assert seen["me"] == 1
    assert seen["write 1"] == seen["write child"] == "OK"  # itself, not the host's init
    assert seen["write host"] == "ESRCH"  # a PID it cannot see
    assert seen["b"] == [1, seen["child"]]
    assert seen["a"] == [0]  # the host's process, outside its namespace
    assert len(seen["b threads"]) == 2 and 1 in seen["b threads"]
    assert pids(mnt / "a") == [host.pid]  # the host's init never moved
    assert 1 not in pids(mnt / "b") and len(pids(mnt / "b")) == 2


def test_the_control_socket_speaks_the_containers_pids(mnt, container):
    seen, host, _ = container
    assert seen["allocate host"] == "ESRCH"
    assert seen["status b"] == [1, seen["child"]] and seen["status a"] == [0]
    assert seen["holders"] == [seen["child"]]
    with Client.connect(mount=str(mnt)) as client:  # the host sees the host's PIDs
        (holder,) = client.status()["holders"]
        assert holder["pid"] in pids(mnt / "b") and holder["ids"] == seen["allocated"]


def test_freeze_and_kill_reach_only_the_containers_processes(mnt, container):
    """What the container placed is all a freeze or a kill of its cgroup reaches."""
    seen, host, inside = container
    write(mnt / "b/cgroup.freeze", "1")
    wait_until(lambda: events(mnt / "b")["frozen"] == 1, "b to freeze")
    assert events(mnt / "a")["frozen"] == 0 and host.poll() is None
    write(mnt / "b/cgroup.kill", "1")
    wait_until(lambda: events(mnt / "b")["populated"] == 0, "b to empty")
    assert inside.wait(timeout=DEADLINE) != 0  # its PID 1 was killed
    assert host.poll() is None and pids(mnt / "a") == [host.pid]
