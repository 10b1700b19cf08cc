"""inotify on the files the daemon changes by itself, as kernfs_notify() raises IN_MODIFY.

Checked on this machine's cgroup2 in a scratch cgroup: a process moved in and killed gives
IN_MODIFY on cgroup.events twice, to a watch on the file and to one on its directory (with the
file's name), and nothing else on cgroup.events."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from inotify_simple import INotify, flags
from mountutil import DEADLINE, inotifywait_modify, read, write

from encidfs.client import Client, ControlError


class Watches:
    """One inotify instance; next_modified() is the next file reported modified."""

    def __init__(self) -> None:
        self.inotify = INotify()
        self._paths: dict[int, Path] = {}
        self._queued: list[Path] = []

    def add(self, path: Path) -> None:
        self._paths[self.inotify.add_watch(path, flags.MODIFY)] = path

    def next_modified(self) -> Path:
        deadline = time.monotonic() + DEADLINE
        while not self._queued:
            left = deadline - time.monotonic()
            assert left > 0, "no IN_MODIFY within the deadline"
            for event in self.inotify.read(timeout=int(left * 1000)):
                assert event.mask & flags.MODIFY
                watched = self._paths[event.wd]
                self._queued.append(watched / event.name if event.name else watched)
        return self._queued.pop(0)

    def count_until_quiet(self, quiet: float) -> int:
        """How many events are queued and come until none has come for `quiet` seconds.
        (Reading them as they come matters: inotify merges an event into the last one queued
        if they are the same and that one is unread.)"""
        count = len(self._queued)
        self._queued.clear()
        while events := self.inotify.read(timeout=int(quiet * 1000)):
            count += len(events)
        return count

    def seen_until(self, path: Path, content: str) -> list[str]:
        """The names reported modified until one is `path` reading `content`: a change made
        before the watches were added may still be reported after (the daemon's truncates
        follow its changes), so a test waits for the state it expects, as a watcher would."""
        seen = []
        while (modified := self.next_modified()) != path or read(path) != content:
            seen.append(modified.name)
        return seen

    def close(self) -> None:
        self.inotify.close()


@pytest.fixture
def watches():
    watches = Watches()
    yield watches
    watches.close()


def test_populated_changes_raise_in_modify_on_the_file_and_its_directory(mnt, procs, watches):
    cg = mnt / "a"
    cg.mkdir()
    events = cg / "cgroup.events"
    watches.add(events)
    watches.add(cg)
    sleeper = procs.sleep()
    write(cg / "cgroup.procs", str(sleeper.pid))
    seen = [watches.next_modified() for _ in range(3)]  # cgroup.procs (written), and events
    assert sorted(map(str, seen)) == sorted(map(str, [cg / "cgroup.procs", events, events]))
    sleeper.kill()
    sleeper.wait()
    assert [watches.next_modified(), watches.next_modified()] == [events, events]
    assert read(events) == "populated 0\nfrozen 0\n"


def test_frozen_changes_raise_in_modify(mnt, procs, watches):
    cg = mnt / "a"
    cg.mkdir()
    write(cg / "cgroup.procs", str(procs.sleep().pid))
    watches.add(cg / "cgroup.events")
    write(cg / "cgroup.freeze", "1")
    watches.seen_until(cg / "cgroup.events", "populated 1\nfrozen 1\n")
    write(cg / "cgroup.freeze", "0")
    watches.seen_until(cg / "cgroup.events", "populated 1\nfrozen 0\n")


def test_a_freeze_an_ancestor_decides_still_raises_in_modify(mnt, watches):
    """cgroup_freeze() notifies even when an ancestor's freeze leaves nothing to change
    ("nothing to wait for"): the kernel's test_cgfreezer_tree waits for that event."""
    (mnt / "a/b").mkdir(parents=True)
    watches.add(mnt / "a/b/cgroup.events")
    write(mnt / "a/cgroup.freeze", "1")
    watches.seen_until(mnt / "a/b/cgroup.events", "populated 0\nfrozen 1\n")
    write(mnt / "a/b/cgroup.freeze", "1")
    assert watches.next_modified() == mnt / "a/b/cgroup.events"
    write(mnt / "a/b/cgroup.freeze", "0")
    assert watches.next_modified() == mnt / "a/b/cgroup.events"


def test_a_refusal_raises_in_modify_on_the_events_files_it_changed_only(mnt, procs, watches):
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    cg = mnt / "a"
    cg.mkdir()
    write(cg / "misc.max", "sev 0")
    watches.add(cg / "cgroup.events")
    sleeper = procs.sleep()
    write(cg / "cgroup.procs", str(sleeper.pid))
    # Its IN_MODIFY seen, nothing of the move is still to come.
    watches.seen_until(cg / "cgroup.events", "populated 1\nfrozen 0\n")
    for name in ("misc.events", "misc.events.local", "encids.sev.events"):
        watches.add(cg / name)
    with Client.connect(mount=str(mnt)) as client, pytest.raises(ControlError):
        client.allocate("sev", pid=sleeper.pid)
    sleeper.kill()  # a change after the refusal's, to know that nothing more came before it
    seen = watches.seen_until(cg / "cgroup.events", "populated 0\nfrozen 0\n")
    assert sorted(set(seen) - {"cgroup.events"}) == ["misc.events", "misc.events.local"]


def test_a_file_is_notified_at_most_once_in_10_ms_and_the_last_change_is_never_lost(
        mnt, procs, watches):
    """cgroup_file_notify(): CGROUP_FILE_NOTIFY_MIN_INTV.  On this machine's cgroup2, 200
    moves between two scratch cgroups in 23 ms gave 2 IN_MODIFY on one's cgroup.events (read
    as they came); before encidfs held them, it truncated the file for each of the 200."""
    a, b = mnt / "a", mnt / "b"
    a.mkdir()
    b.mkdir()
    pid = str(procs.sleep().pid)
    watches.add(a / "cgroup.events")
    moves, notified = 200, 0
    start = time.monotonic()
    for i in range(moves):
        notified += watches.count_until_quiet(0)
        write((a, b)[i % 2] / "cgroup.procs", pid)
    elapsed = time.monotonic() - start
    notified += watches.count_until_quiet(0.1)
    assert 1 <= notified <= elapsed / 0.01 + 3  # one at once, then one an interval at most

    # A change within the interval of the last notification is notified when it is up.
    write(a / "cgroup.procs", pid)
    assert watches.next_modified() == a / "cgroup.events"
    write(b / "cgroup.procs", pid)
    assert watches.seen_until(a / "cgroup.events", "populated 0\nfrozen 0\n") == []


def test_inotifywait_sees_a_populated_change(mnt, procs):
    cg = mnt / "a"
    cg.mkdir()
    out = inotifywait_modify(cg / "cgroup.events",
                             lambda: write(cg / "cgroup.procs", str(procs.sleep().pid)))
    assert out == f"{cg / 'cgroup.events'} MODIFY\n"


def test_nothing_is_truncated_for_a_cgroup_removed_meanwhile(mnt, procs):
    """Changes that fan out for a cgroup gone before its truncate come to nothing: no error in
    the log (the fixture fails the test on one), and the daemon goes on."""
    for round_ in range(50):
        cg = mnt / f"c{round_}"
        cg.mkdir()
        sleeper = procs.sleep()
        write(cg / "cgroup.procs", str(sleeper.pid))
        write(mnt / "cgroup.procs", str(sleeper.pid))
        os.rmdir(cg)
        sleeper.kill()
        sleeper.wait()
    assert read(mnt / "cgroup.stat").startswith("nr_descendants 0\n")
