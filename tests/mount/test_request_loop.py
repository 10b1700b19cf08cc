"""One request loop: the daemon serves FUSE requests one at a time, so no request's reply may
wait for something only another request can bring about (a kernel invalidation waits for the
requests that hold the directory's lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

