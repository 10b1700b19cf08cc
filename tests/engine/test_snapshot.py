"""Snapshots: dump() and load() give back the engine exactly, dying cgroups and offline csses
included, with every counter as the operations left it."""

import errno

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from encidfs.engine import EncidsController, MiscController, new_engine, snapshot

ENCIDS = 1
CAPACITIES = {"sev": 8, "sev_es": 3}
BOTH = (EncidsController, MiscController)
ENCIDS, MISC = 1, 2  # subtree_control masks
NAMES = ("a", "b", "c")
PIDS = range(1, 7)


def fingerprint(engine):
    """Everything a snapshot must give back, with the counters, in dump order."""
    h, allocator = engine.hierarchy, engine.allocator
    csses = snapshot._csses(h, allocator)
    cgroups = snapshot._cgroups(h, csses)
    index = {css: i for i, css in enumerate(csses)}
    return (
        [(cg.id, cg.parent.id if cg.parent else None, cg.name, cg.dying, cg.level, cg.refs,
          cg.nr_descendants, cg.nr_dying_descendants, tuple(cg.nr_dying_subsys),
          cg.nr_populated_children, cg.populated, sorted(cg.children), sorted(cg.procs or ()),
          [index.get(css) for css in cg.css]) for cg in cgroups],
        [(css.ssid, css.cgroup.id, index.get(css.parent), css.online, css.refs,
          css.nr_descendants, tuple(css.usage), tuple(css.max), tuple(css.peak),
          tuple(css.events), tuple(css.events_local)) for css in csses],
        sorted(h.by_id), {pid: cg.id for pid, cg in h.procs.members.items()},
        {pid: sorted(ids) for pid, ids in allocator.holdings().items()},
        sorted((cg.id, cg.path) for cg in allocator.origins()),
    )


def free_ids(engine):
    allocator = engine.allocator
    return [[i for i in space.ids if allocator.holder_of(i) is None]
            for space in allocator.spaces]


def round_trip(engine, controllers=BOTH):
    data = snapshot.dump(engine.hierarchy, engine.allocator)
    copy = new_engine(CAPACITIES, controllers=controllers)
    snapshot.load(copy.hierarchy, copy.allocator, data)
    return data, copy


class SnapshotMachine(RuleBasedStateMachine):
    """Random operations through the engine's own methods (refusals change nothing); after
    each, a snapshot round trip must give back the same engine."""

    def __init__(self):
        super().__init__()
        self.engine = new_engine(CAPACITIES, controllers=BOTH)
        self.h = self.engine.hierarchy
        self.allocator = self.engine.allocator

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

    @rule(data=st.data(), enable=st.booleans(), mask=st.sampled_from([ENCIDS, MISC]))
    def subtree_control(self, data, enable, mask):
        masks = (mask, 0) if enable else (0, mask)
        self.attempt(lambda: self.h.write_subtree_control(self.cgroup(data), *masks))

    @rule(data=st.data(), controller=st.sampled_from([0, 1]), t=st.sampled_from([0, 1]),
          value=st.integers(0, 9))
    def set_max(self, data, controller, t, value):
        self.attempt(lambda: self.h.controllers[controller].set_max(self.cgroup(data), t, value))

    @rule(data=st.data(), pid=st.sampled_from(PIDS), freeze=st.booleans())
    def settings(self, data, pid, freeze):
        cg = self.cgroup(data)
        self.attempt(lambda: self.h.set_max_depth(cg, pid))
        self.attempt(lambda: self.h.freezer.set_freeze(cg, freeze))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def attach(self, data, pid):
        self.attempt(lambda: self.h.procs.attach(pid, self.cgroup(data)))

    @rule(pid=st.sampled_from(PIDS))
    def exit(self, pid):
        self.h.procs.exit(pid)
        self.allocator.release_holder(pid)

    @rule(pid=st.sampled_from(PIDS), type_name=st.sampled_from(list(CAPACITIES)),
          count=st.integers(1, 3))
    def allocate(self, pid, type_name, count):
        self.attempt(lambda: self.allocator.allocate(pid, type_name, count))

    @rule(data=st.data())
    def free(self, data):
        held = sorted(i for ids in self.allocator.holdings().values() for i in ids)
        if held:
            self.allocator.free(data.draw(st.lists(st.sampled_from(held), min_size=1,
                                                   unique=True)))

    @invariant()
    def a_snapshot_gives_back_the_same_engine(self):
        self.h.drain_events()
        data, copy = round_trip(self.engine)
        assert snapshot.dump(copy.hierarchy, copy.allocator) == data
        assert fingerprint(copy) == fingerprint(self.engine)
        assert free_ids(copy) == free_ids(self.engine)


TestSnapshot = SnapshotMachine.TestCase
TestSnapshot.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                 database=None)


def test_an_allocation_keeps_the_released_cgroup_it_was_charged_in():
    """Charged in /x/y at the root's csses (no controller enabled below the root), the holder
    moved out, /x/y and /x removed: nothing pins them, but the allocation names them."""
    engine = new_engine(CAPACITIES, controllers=BOTH)
    h, allocator = engine.hierarchy, engine.allocator
    y = h.mkdir(h.mkdir(h.root, "x"), "y")
    h.procs.attach(3, y)
    allocator.allocate(3, "sev", 1)
    h.procs.attach(3, h.root)
    h.rmdir(y)
    h.rmdir(h.by_id[y.parent.id])
    data, copy = round_trip(engine)
    assert fingerprint(copy) == fingerprint(engine)
    assert [cg.path for cg in copy.allocator.origins()] == ["/x/y"]


def test_a_loaded_engine_goes_on_as_the_original_would():
    engine = new_engine(CAPACITIES, controllers=BOTH)
    h, allocator = engine.hierarchy, engine.allocator
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS, 0)
    b = h.mkdir(a, "b")
    h.procs.attach(7, b)
    allocator.allocate(7, "sev", 3)
    h.procs.attach(7, h.root)
    h.rmdir(b)  # dying, pinned by the charge
    allocator.free([2])
    _, copy = round_trip(engine)
    assert copy.allocator.allocate(9, "sev", 2) == allocator.allocate(9, "sev", 2) == [2, 4]
    copy.allocator.release_holder(7)
    allocator.release_holder(7)
    assert fingerprint(copy) == fingerprint(engine)
    assert copy.hierarchy.root.nr_dying_descendants == 0
    assert "b" not in copy.hierarchy.by_id[a.id].children


def test_a_controller_the_snapshot_lacks_starts_with_what_is_held():
    # A snapshot of a daemon that offered encids alone, loaded where misc is offered too.
    engine = new_engine(CAPACITIES)
    h, allocator = engine.hierarchy, engine.allocator
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    h.procs.attach(7, a)
    allocator.allocate(7, "sev", 3)
    _, copy = round_trip(engine, BOTH)
    misc = copy.hierarchy.controller("misc")
    assert misc.css_of(copy.hierarchy.root).usage == [3, 0]
    assert copy.hierarchy.controller("encids").css_of(copy.hierarchy.by_id[a.id]).usage == [3, 0]
    copy.allocator.release_holder(7)
    assert misc.css_of(copy.hierarchy.root).usage == [0, 0]
    # And back: a controller no longer offered is left out.
    _, back = round_trip(copy, (EncidsController,))
    assert [c.name for c in back.hierarchy.controllers] == ["encids"]


@pytest.mark.parametrize("depth", [10_000])
@pytest.mark.slow
def test_a_deep_chain_loads_in_one_pass(depth):
    engine = new_engine(CAPACITIES)
    cg = engine.hierarchy.root
    for _ in range(depth):
        cg = engine.hierarchy.mkdir(cg, "c")
    _, copy = round_trip(engine)
    assert copy.hierarchy.root.nr_descendants == depth
    assert max(cg.level for cg in copy.hierarchy.by_id.values()) == depth
