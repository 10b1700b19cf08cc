"""The controller hooks, through the test-only counting controller (counter.py): the hierarchy
asks it about every move, fork and exit of the processes it follows, and the journal applies
its setting."""

import errno

import pytest
from counter import CountController, count_files
from fakes import changes_for

from encidfs.engine import EncidsController, new_engine
from encidfs.engine.snapshot import dump, load
from encidfs.files.encids import encids_files
from encidfs.state.operations import Op

COUNT = 2  # subtree_control mask of count, the second controller


@pytest.fixture
def engine():
    return new_engine({"sev": 4}, controllers=(EncidsController, CountController))


@pytest.fixture
def h(engine):
    h = engine.hierarchy
    h.write_subtree_control(h.root, COUNT, 0)
    return h


def counts(h, *cgroups):
    return [cg.css[1].count for cg in cgroups]


def test_moves_forks_and_exits_are_counted(h):
    a = h.mkdir(h.root, "a")
    h.procs.attach(100, a)
    h.procs.fork(100, 101)
    assert counts(h, a) == [2]
    h.procs.exit(100)
    h.procs.attach(101, h.root)
    assert counts(h, a) == [0]
    h.procs.exit(101)  # at the root: not followed, not counted
    assert counts(h, a) == [0]


def test_a_limit_vetoes_a_move_and_a_fork(h):
    a = h.mkdir(h.root, "a")
    b = h.mkdir(h.root, "b")
    h.controller("count").apply_setting(a, "max", 1, lambda: None)
    h.procs.attach(100, a)
    with pytest.raises(OSError) as refused:
        h.procs.attach(200, a)
    assert refused.value.errno == errno.EAGAIN
    with pytest.raises(OSError) as refused:
        h.procs.fork(100, 101)
    assert refused.value.errno == errno.EAGAIN
    assert h.procs.cgroup_of(200) is h.root and h.procs.cgroup_of(101) is h.root
    assert counts(h, a, b) == [1, 0]
    h.procs.attach(100, b)
    h.procs.attach(200, a)
    assert counts(h, a, b) == [1, 1]


def test_a_move_within_the_limited_subtree_passes(h):
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, COUNT, 0)
    b, c = h.mkdir(a, "b"), h.mkdir(a, "c")
    h.controller("count").apply_setting(a, "max", 1, lambda: None)
    h.procs.attach(100, b)
    h.procs.attach(100, c)  # a counts it already
    assert counts(h, a, b, c) == [1, 0, 1]


def test_enabling_below_processes_moves_them_to_the_new_csses(h):
    a = h.mkdir(h.root, "a")
    b = h.mkdir(a, "b")
    h.procs.attach(100, b)  # counted at a's css: b has none yet
    h.write_subtree_control(a, COUNT, 0)
    assert counts(h, a, b) == [1, 1]
    h.write_subtree_control(a, 0, COUNT)
    assert counts(h, a) == [1]
    h.procs.exit(100)
    assert counts(h, a) == [0]


def test_the_journal_applies_the_setting_and_a_snapshot_keeps_the_counts(engine, h):
    changes = changes_for(engine, tables=[encids_files, count_files])
    a = h.mkdir(h.root, "a")
    changes.run(Op.CONTROLLER_SETTING, a.id, "count", "max", 1)
    changes.run(Op.ATTACH, 100, 0, a.id)
    with pytest.raises(OSError) as refused:
        changes.run(Op.ATTACH, 200, 0, a.id)
    assert refused.value.errno == errno.EAGAIN
    copy = new_engine({"sev": 4}, controllers=(EncidsController, CountController))
    load(copy.hierarchy, copy.allocator, dump(h, engine.allocator))
    restored = copy.hierarchy.by_id[a.id].css[1]
    assert (restored.count, restored.max) == (1, 1)
