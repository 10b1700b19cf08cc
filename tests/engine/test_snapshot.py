"""Snapshots: dump() and load() give back the engine exactly, dying cgroups and offline csses
included, with every counter as the operations left it."""

import errno

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from encidfs.engine import new_hierarchy
from encidfs.engine import snapshot

ENCIDS = 1
CAPACITIES = {"sev": 8, "sev_es": 3}
NAMES = ("a", "b", "c")
PIDS = range(1, 7)


def fingerprint(h):
    """Everything a snapshot must give back, with the counters, in dump order."""
    csses = snapshot._csses(h)
    cgroups = snapshot._cgroups(h, csses)
    index = {css: i for i, css in enumerate(csses)}
    return (
        [(cg.id, cg.parent.id if cg.parent else None, cg.name, cg.dying, cg.level, cg.refs,
          cg.nr_descendants, cg.nr_dying_descendants, tuple(cg.nr_dying_subsys),
          cg.nr_populated_children, cg.populated, sorted(cg.children), sorted(cg.procs or ()),
          [index.get(css) for css in cg.css]) for cg in cgroups],
        [(css.cgroup.id, index.get(css.parent), css.online, css.refs, css.nr_descendants,
          tuple(css.usage), tuple(css.max), tuple(css.events)) for css in csses],
        sorted(h.by_id), {pid: cg.id for pid, cg in h.members.items()},
        {pid: sorted(ids) for pid, ids in h.controller("encids").holdings().items()},
    )


def free_ids(h):
    encids = h.controller("encids")
    return {t: [i for i in space.ids if encids.holder_of(i) is None]
            for t, space in zip(encids.types, encids.spaces)}


def round_trip(h):
    data = snapshot.dump(h)
    copy = new_hierarchy(CAPACITIES)
    snapshot.load(copy, data)
    return data, copy


class SnapshotMachine(RuleBasedStateMachine):
    """Random operations through the engine's own methods (refusals change nothing); after
    each, a snapshot round trip must give back the same engine."""

    def __init__(self):
        super().__init__()
        self.h = new_hierarchy(CAPACITIES)
        self.encids = self.h.controller("encids")

    def cgroup(self, data):
        live = sorted(self.h.by_id.values(), key=lambda cg: cg.id)
        return data.draw(st.sampled_from(live))

    def attempt(self, operation):
        try:
            operation()
        except OSError as error:
            assert error.errno in (errno.EBUSY, errno.EEXIST, errno.EAGAIN, errno.ENOENT,
                                   errno.EINVAL, errno.ENODEV), error

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def mkdir(self, data, name):
        self.attempt(lambda: self.h.mkdir(self.cgroup(data), name))

    @rule(data=st.data())
    def rmdir(self, data):
        self.attempt(lambda: self.h.rmdir(self.cgroup(data)))

    @rule(data=st.data(), enable=st.booleans())
    def subtree_control(self, data, enable):
        mask = (ENCIDS, 0) if enable else (0, ENCIDS)
        self.attempt(lambda: self.h.write_subtree_control(self.cgroup(data), *mask))

    @rule(data=st.data(), t=st.sampled_from([0, 1]), value=st.integers(0, 9))
    def set_max(self, data, t, value):
        self.attempt(lambda: self.encids.set_max(self.cgroup(data), t, value))

    @rule(data=st.data(), pid=st.sampled_from(PIDS), freeze=st.booleans())
    def settings(self, data, pid, freeze):
        cg = self.cgroup(data)
        self.attempt(lambda: self.h.set_max_depth(cg, pid))
        self.attempt(lambda: self.h.set_freeze(cg, freeze))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def attach(self, data, pid):
        self.attempt(lambda: self.h.attach(pid, self.cgroup(data)))

    @rule(pid=st.sampled_from(PIDS))
    def exit(self, pid):
        self.h.exit(pid)
        self.encids.release_holder(pid)

    @rule(pid=st.sampled_from(PIDS), type_name=st.sampled_from(list(CAPACITIES)),
          count=st.integers(1, 3))
    def allocate(self, pid, type_name, count):
        self.attempt(lambda: self.encids.allocate(pid, type_name, count))

    @rule(data=st.data())
    def free(self, data):
        held = sorted(i for ids in self.encids.holdings().values() for i in ids)
        if held:
            self.encids.free(data.draw(st.lists(st.sampled_from(held), min_size=1,
                                                unique=True)))

    @invariant()
    def a_snapshot_gives_back_the_same_engine(self):
        self.h.drain_changes()
        data, copy = round_trip(self.h)
        assert snapshot.dump(copy) == data
        assert fingerprint(copy) == fingerprint(self.h)
        assert free_ids(copy) == free_ids(self.h)


TestSnapshot = SnapshotMachine.TestCase
TestSnapshot.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                 database=None)


def test_a_loaded_engine_goes_on_as_the_original_would():
    h = new_hierarchy(CAPACITIES)
    encids = h.controller("encids")
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS, 0)
    b = h.mkdir(a, "b")
    h.attach(7, b)
    encids.allocate(7, "sev", 3)
    h.attach(7, h.root)
    h.rmdir(b)  # dying, pinned by the charge
    encids.free([2])
    _, copy = round_trip(h)
    copied = copy.controller("encids")
    assert copied.allocate(9, "sev", 2) == encids.allocate(9, "sev", 2) == [2, 4]
    copied.release_holder(7)
    encids.release_holder(7)
    assert fingerprint(copy) == fingerprint(h)
    assert copy.root.nr_dying_descendants == 0 and "b" not in copy.by_id[a.id].children


@pytest.mark.parametrize("depth", [10_000])
def test_a_deep_chain_loads_in_one_pass(depth):
    h = new_hierarchy(CAPACITIES)
    cg = h.root
    for _ in range(depth):
        cg = h.mkdir(cg, "c")
    _, copy = round_trip(h)
    assert copy.root.nr_descendants == depth
    assert max(cg.level for cg in copy.by_id.values()) == depth
