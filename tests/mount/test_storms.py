"""Process storms in a member cgroup, on both tracking modes: the books are exact afterwards.

A compiled forker (storm.c) makes thousands of processes in a cgroup of the mount: one after
another, all alive at once, a chain of orphans, threads, double-forking daemons, fork and exec.
After each, cgroup.procs lists exactly the processes alive in the cgroup, cgroup.events and
cgroup.stat agree, a holder of IDs beside the storm keeps them, and the daemon logs no error
(the plugin fails the test on one).  Reads settle what the tracker has been told first, so the
first read after a storm must already be right; the deadline is the issue's one second.
"""

from __future__ import annotations

import pytest
from mountutil import events, keyed, pids, read, wait_until, write

from encidfs.client import Client

CONVERGED = 1.0  # seconds after a storm within which the books are exact

STORMS = [("flat", 5000), ("exec", 1000), ("wide", 1000), ("chain", 1000), ("threads", 3000),
          ("daemons", 100)]


@pytest.fixture(params=["auto", "scan"])
def tracked(request, mount_encidfs):
    """A mount on each tracking mode: the proc connector (as root), and /proc scans."""
    return request.param, mount_encidfs("--tracking", request.param)


def exactly(cgroup, expected: list[int]) -> None:
    wait_until(lambda: pids(cgroup) == sorted(expected),
               f"cgroup.procs of {cgroup.name} to list exactly {len(expected)} processes",
               timeout=CONVERGED)


@pytest.mark.parametrize("mode, n", STORMS)
def test_after_a_storm_the_cgroup_lists_exactly_its_live_processes(tracked, storm, mode, n):
    tracking, mnt = tracked
    a = mnt / "a"
    a.mkdir()
    forker = storm(mode, n)
    write(a / "cgroup.procs", str(forker.pid))
    daemons = forker.go()
    if tracking == "scan" and mode == "daemons":
        # A scan places a child by its parent: a daemon whose parent exited before any scan
        # looked cannot be told from any other orphan (README, "What tracking cannot know").
        listed = pids(a)
        assert forker.pid in listed and set(listed) <= {forker.pid, *daemons}
    else:
        exactly(a, [forker.pid, *daemons])
    assert events(a)["populated"] == 1
    forker.end()
    exactly(a, [])
    assert events(a) == {"populated": 0, "frozen": 0}
    assert not set(daemons) & set(pids(mnt / "a"))
    assert keyed(read(mnt / "cgroup.stat"))["nr_descendants"] == 1


@pytest.mark.slow
def test_one_mount_takes_every_storm_in_turn(tracked, storm):
    """The storms one after another on one mount, in one cgroup: what one leaves behind (a
    process listed for good, a lost event) would show in the next."""
    tracking, mnt = tracked
    a = mnt / "a"
    a.mkdir()
    for mode, n in STORMS:
        forker = storm(mode, n)
        write(a / "cgroup.procs", str(forker.pid))
        daemons = forker.go()
        if not (tracking == "scan" and mode == "daemons"):
            exactly(a, [forker.pid, *daemons])
        forker.end()
        exactly(a, [])


def test_a_holder_beside_a_storm_keeps_its_ids(tracked, storm, procs):
    tracking, mnt = tracked
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    holder = procs.sleep()
    write(a / "cgroup.procs", str(holder.pid))
    with Client.connect(mount=str(mnt)) as client:
        ids = client.allocate("sev", count=2, pid=holder.pid)
        forker = storm("flat", 5000)
        write(a / "cgroup.procs", str(forker.pid))
        forker.go()
        exactly(a, [holder.pid, forker.pid])
        forker.end()
        exactly(a, [holder.pid])
        assert [(h["pid"], h["ids"]) for h in client.status()["holders"]] == [(holder.pid, ids)]
    assert read(a / "encids.sev.current") == "2\n"
