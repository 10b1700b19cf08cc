"""One request loop: the daemon serves FUSE requests one at a time, so no request's reply may
wait for something only another request can bring about (a kernel invalidation waits for the
requests that hold the directory's lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import DEADLINE, read, write

SECONDS = 3.0  # of concurrent load

# One kind of load on the limit files of a cgroup whose parent turns encids on and off: their
# entries are invalidated at every turn, so lookups keep taking the directory's lock.
LOAD = r"""
import os, sys, time
kind, parent, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
child = os.path.join(parent, "b")
names = ["encids.sev.max", "encids.sev.current", "encids.sev.events", "cgroup.procs"]
done = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        if kind == "toggle":
            fd = os.open(os.path.join(parent, "cgroup.subtree_control"), os.O_WRONLY)
            try:
                os.write(fd, b"-encids" if done % 2 else b"+encids")
            finally:
                os.close(fd)
        elif kind == "list":
            os.listdir(child)
        else:
            path = os.path.join(child, names[done % len(names)])
            if kind == "stat":
                os.stat(path)
            else:  # an open, a read or a write, and the release of the close
                fd = os.open(path, os.O_RDONLY if kind == "read" else os.O_WRONLY)
                try:
                    os.read(fd, 100) if kind == "read" else os.write(fd, b"max")
                finally:
                    os.close(fd)
    except OSError:
        pass  # the file is gone this turn
    done += 1
print(done)
"""


@pytest.mark.slow
def test_invalidation_under_concurrent_requests_never_deadlocks(cg: Path):
    (cg / "b").mkdir()
    kinds = ["toggle", "toggle", "stat", "stat", "read", "read", "write", "list"]
    loads = [subprocess.Popen([sys.executable, "-c", LOAD, kind, str(cg), str(SECONDS)],
                              stdout=subprocess.PIPE, text=True) for kind in kinds]
    stuck = []
    try:
        for kind, load in zip(kinds, loads):
            try:
                out, _ = load.communicate(timeout=SECONDS + DEADLINE)
            except subprocess.TimeoutExpired:
                stuck.append(kind)
                continue
            assert load.returncode == 0 and int(out) > 0, kind
    finally:
        for load in loads:
            load.kill()
            load.wait()
    assert stuck == [], f"requests still waiting {DEADLINE} s after the load ended: {stuck}"
    write(cg / "cgroup.subtree_control", "+encids")
    assert read(cg / "b/encids.sev.max") == "max\n"


# Rounds of: fork a child, move it into the cgroup, give it an ID, let it exit, reap it, and
# look at once.  Prints what still showed the child after waitpid() returned.
EXIT_ROUNDS = r"""
import os, sys
from encidfs.client import Client
mnt, rounds = sys.argv[1], int(sys.argv[2])
cg = os.path.join(mnt, "fresh")
# Opened ahead: each look is one read request, as soon after waitpid() as can be.
files = {name: os.open(os.path.join(cg, name), os.O_RDONLY)
         for name in ("cgroup.procs", "cgroup.events", "encids.sev.current")}
def read(name):
    return os.pread(files[name], 65536, 0).decode()
stale = []
with Client.connect(mount=mnt) as client:
    for round in range(rounds):
        go, wait = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(wait)
            os.read(go, 1)  # until the parent closes its end
            os._exit(0)
        os.close(go)
        fd = os.open(os.path.join(cg, "cgroup.procs"), os.O_WRONLY)
        os.write(fd, str(pid).encode())
        os.close(fd)
        client.allocate("sev", pid=pid)
        os.close(wait)
        os.waitpid(pid, 0)
        seen = {"cgroup.procs": str(pid) in read("cgroup.procs").split(),
                "populated": "populated 1" in read("cgroup.events"),
                "encids.sev.current": read("encids.sev.current") != "0\n"}
        stale += [f"round {round}: {name}" for name, shown in seen.items() if shown]
print("".join(line + "\n" for line in stale), end="")
"""


@pytest.mark.parametrize("tracking", ["auto", "scan"])
@pytest.mark.slow
def test_an_exit_is_seen_as_soon_as_waitpid_returns(mount_encidfs, tracking):
    """In the kernel a task leaves its cgroup in do_exit, before its parent can reap it."""
    mnt = mount_encidfs("--tracking", tracking)
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "fresh").mkdir()
    result = subprocess.run([sys.executable, "-c", EXIT_ROUNDS, str(mnt), "1000"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stale = result.stdout.splitlines()
    assert stale[:10] == [], f"{len(stale)} stale reads after waitpid() in 1000 rounds"
