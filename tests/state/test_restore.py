"""The journal replayed without a mount: the records a sequence of requests and facts leaves,
replayed into a fresh engine (by Changes.replay, or by restore() from a store's files), give
back the same snapshot; a change the journal refuses is never applied."""

from __future__ import annotations

import errno
import stat

import pytest
from errnos import raises_errno
from fakes import Requests, changes_for

from encidfs.engine import ChargeRefused, EncidsController, MiscController, new_engine
from encidfs.files.cftype import Caller
from encidfs.files.kernfs import ROOT_INODE
from encidfs.state import restore
from encidfs.state.changes import Changes, Journal
from encidfs.state.operations import Op
from encidfs.state.store import StateStore

ROOT = Caller(pid=1, uid=0, gid=0)
ALICE = Caller(pid=2, uid=1000, gid=1000)
LAYOUT = {"sev": 4, "sev_es": 2}


class Recorder:
    """A journal that keeps its records in memory, facts staged before the next record, or
    refuses every commit once `full`."""

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.staged: list[tuple] = []
        self.full = False

    def append(self, record: tuple) -> None:
        self.append_all([record])

    def append_all(self, records: list[tuple]) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "full")
        self.records += self.staged + records
        self.staged = []

    def stage(self, record: tuple) -> None:
        self.staged.append(record)


def fresh(journal: Journal | None = None) -> Changes:
    engine = new_engine(LAYOUT, controllers=(EncidsController, MiscController))
    engine.hierarchy.clock = lambda: 10**12  # freezing times the same on both sides
    return changes_for(engine, journal)


def state(changes: Changes) -> dict:
    data = restore.snapshot(changes)
    del data["boot"]
    return data


def write(fs: Requests, inode: int, name: str, text: bytes, caller: Caller = ROOT) -> None:
    fs.open(fs.lookup(inode, name.encode()), caller).write(text)


def mkdir(fs: Requests, parent: int, name: str, caller: Caller = ROOT) -> int:
    return fs.mkdir(parent, name.encode(), stat.S_IFDIR | 0o755, caller).inode


def requests(changes: Changes) -> None:
    """Some of every kind of change, through the files as a mount's requests make them."""
    fs = Requests(changes)
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids +misc")
    a = mkdir(fs, ROOT_INODE, "a", ALICE)
    b = mkdir(fs, a, "b", ALICE)
    mkdir(fs, ROOT_INODE, "gone")
    write(fs, a, "cgroup.subtree_control", b"+encids", ALICE)
    write(fs, a, "encids.sev.max", b"2")
    write(fs, a, "misc.max", b"sev_es 1")
    write(fs, a, "cgroup.freeze", b"1")
    write(fs, b, "cgroup.procs", b"10")
    changes.fact(Op.FORK, 10, 11, 111)
    changes.run(Op.ALLOCATE, 10, 110, "sev", 2, fs.node(b).cgroup.id)
    with pytest.raises(ChargeRefused):  # refused, and its events counted: staged
        changes.run(Op.ALLOCATE, 11, 111, "sev", 1, fs.node(b).cgroup.id)
    changes.fact(Op.EXIT, 11)
    procs = fs.lookup(b, b"cgroup.procs")
    fs.setattr(procs, mode=0o664, gid=7)
    fs.setxattr(procs, b"user.note", b"\xffkept", ALICE)
    fs.setxattr(fs.node(a), b"user.gone", b"", ALICE)
    fs.removexattr(fs.node(a), b"user.gone")
    fs.rmdir(ROOT_INODE, b"gone")


def test_replayed_records_give_the_same_state():
    journal = Recorder()
    live = fresh(journal)
    requests(live)
    replayed = fresh()
    assert replayed.replay(journal.records + journal.staged) == 0
    assert state(replayed) == state(live)


def test_a_change_the_journal_refuses_is_not_applied():
    journal = Recorder()
    live = fresh(journal)
    fs = Requests(live)
    before = state(live)
    journal.full = True
    with raises_errno(errno.ENOSPC):
        mkdir(fs, ROOT_INODE, "a")
    with raises_errno(errno.ENOSPC):
        fs.setxattr(fs.node(ROOT_INODE), b"user.a", b"1", ROOT)
    assert state(live) == before and journal.records == []


def test_restore_from_a_checkpoint_and_the_journal_after_it(tmp_path):
    path = str(tmp_path / "state.db")
    store = StateStore(path, LAYOUT, durable=False)
    live = fresh(store)
    restore.restore(store, live, lambda pid: None)  # nothing yet: a fresh file
    write(Requests(live), ROOT_INODE, "cgroup.subtree_control", b"+encids")
    store.checkpoint()
    requests(live)  # after the checkpoint: in the journal only
    expected = state(live)
    store.close()
    again = StateStore(path, LAYOUT, durable=False)
    restored = fresh(again)
    watched = restore.restore(again, restored, {10: 110}.get)
    again.close()
    assert watched == [10]
    assert state(restored) == expected


def test_restore_drops_the_processes_that_are_gone(tmp_path):
    path = str(tmp_path / "state.db")
    store = StateStore(path, LAYOUT, durable=False)
    live = fresh(store)
    restore.restore(store, live, lambda pid: None)
    requests(live)
    store.close()
    again = StateStore(path, LAYOUT, durable=False)
    restored = fresh(again)
    # PID 10 is another process now: it exited, and the IDs it held are free.
    assert restore.restore(again, restored, {10: 999}.get) == []
    again.close()
    assert restored.hierarchy.procs.members == {} and restored.allocator.holdings() == {}
    assert restored.starts == {}
