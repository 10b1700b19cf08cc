"""The misc controller's rules (kernel/cgroup/misc.c) beside encids, and the allocator that
charges both, all or nothing; and the rules of older kernels' misc."""

import errno
from collections import Counter

import pytest

from encidfs.engine import ChargeRefused, EncidsController, MiscController, new_engine
from encidfs.engine.kernel import KernelInterface

ENCIDS, MISC = 1, 2  # subtree_control masks
SEV = 0


@pytest.fixture
def engine():
    return new_engine({"sev": 10, "sev_es": 4, "tdx": 0},
                      controllers=(EncidsController, MiscController))


@pytest.fixture
def tree(engine):
    """/a/b and /a/c, with both controllers enabled from the root down to a."""
    h = engine.hierarchy
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS | MISC, 0)
    return a, h.mkdir(a, "b"), h.mkdir(a, "c")


def misc(engine, cg):
    return engine.hierarchy.controller("misc").css_of(cg)


def encids(engine, cg):
    return engine.hierarchy.controller("encids").css_of(cg)


def test_a_refusal_counts_locally_where_it_is_and_in_events_up_to_below_the_root(engine, tree):
    h, controller = engine.hierarchy, engine.hierarchy.controller("misc")
    a, b, _ = tree
    controller.set_max(a, SEV, 1)
    controller.try_charge(b, "sev", 1)
    h.drain_events()
    with pytest.raises(ChargeRefused) as refused:
        controller.try_charge(b, "sev", 1)
    assert (refused.value.controller, refused.value.path) == ("misc", "/a")
    assert [misc(engine, cg).events_local[SEV] for cg in (h.root, a, b)] == [0, 1, 0]
    assert [misc(engine, cg).events[SEV] for cg in (h.root, a, b)] == [0, 1, 0]
    assert Counter(h.drain_events()) == Counter([("misc.events.local", a), ("misc.events", a)])
    # Refused by b's own limit: b counts both, and a its hierarchical events.
    controller.set_max(b, SEV, 1)
    with pytest.raises(ChargeRefused):
        controller.try_charge(b, "sev", 1)
    assert [misc(engine, cg).events_local[SEV] for cg in (a, b)] == [1, 1]
    assert [misc(engine, cg).events[SEV] for cg in (a, b)] == [2, 1]
    assert misc(engine, h.root).events[SEV] == 0


def test_the_capacity_refuses_at_the_first_level_it_binds(engine, tree):
    h, controller = engine.hierarchy, engine.hierarchy.controller("misc")
    a, b, c = tree
    x = h.mkdir(h.root, "x")
    controller.try_charge(c, "sev", 9)
    with pytest.raises(ChargeRefused) as refused:
        controller.try_charge(b, "sev", 2)  # b would hold 2, a 11: over the capacity there
    assert refused.value.path == "/a"
    with pytest.raises(ChargeRefused) as refused:
        controller.try_charge(x, "sev", 2)  # only the root adds a's charges to x's
    assert refused.value.path == "/"
    assert misc(engine, h.root).events_local[SEV] == 1  # no misc.events above the root
    assert [misc(engine, cg).events[SEV] for cg in (h.root, a, x)] == [0, 1, 0]


def test_a_refused_charge_still_raises_the_peak_below_the_refusing_level(engine, tree):
    controller = engine.hierarchy.controller("misc")
    a, b, c = tree
    controller.set_max(a, SEV, 3)
    controller.try_charge(b, "sev", 1)
    controller.try_charge(c, "sev", 2)
    assert [misc(engine, cg).peak[SEV] for cg in (a, b, c)] == [3, 1, 2]
    with pytest.raises(ChargeRefused):
        controller.try_charge(b, "sev", 2)  # b would hold 3 (passes), a 5 (refused)
    assert [misc(engine, cg).usage[SEV] for cg in (a, b, c)] == [3, 1, 2]
    assert [misc(engine, cg).peak[SEV] for cg in (a, b, c)] == [3, 3, 2]
    assert misc(engine, engine.hierarchy.root).peak[SEV] == 3


def test_peaks_stay_when_usage_falls(engine, tree):
    controller = engine.hierarchy.controller("misc")
    _, b, _ = tree
    charge = controller.try_charge(b, "sev", 4)
    controller.uncharge(charge)
    assert misc(engine, b).usage[SEV] == 0 and misc(engine, b).peak[SEV] == 4


@pytest.mark.parametrize("refusing", ["encids", "misc"])
def test_an_allocation_refused_by_one_controller_is_charged_in_none(engine, tree, refusing):
    h, allocator = engine.hierarchy, engine.allocator
    a, b, _ = tree
    h.procs.attach(7, b)
    allocator.allocate(7, "sev", 1)
    h.controller(refusing).set_max(a, SEV, 1)

    def books():
        return {(cg.path, name): (css.usage[:], css.peak[:], css.events[:], css.events_local[:])
                for cg in (h.root, a, b) for name, css in (("encids", encids(engine, cg)),
                                                           ("misc", misc(engine, cg)))}

    before = books()
    with pytest.raises(ChargeRefused) as refused:
        allocator.allocate(7, "sev", 1)
    assert (refused.value.controller, refused.value.path) == (refusing, "/a")
    after = books()
    changed = {key for key in before if before[key] != after[key]}
    # The refusing controller counted it at a (and, encids, at the root) and raised b's
    # watermark (b passed first); the other controller did nothing at all.
    expected = {("/a", refusing), ("/a/b", refusing)}
    expected |= {("/", "encids")} if refusing == "encids" else set()
    assert changed == expected
    assert allocator.holdings() == {7: {1}}
    assert all(css.usage[SEV] == 1 for cg in (h.root, a, b)
               for css in (encids(engine, cg), misc(engine, cg)))


def test_both_controllers_keep_the_same_books(engine, tree):
    h, allocator = engine.hierarchy, engine.allocator
    a, b, c = tree
    h.procs.attach(7, b)
    h.procs.attach(8, c)
    allocator.allocate(7, "sev", 3)
    allocator.allocate(8, "sev_es", 2)
    allocator.free([2])
    for cg in (h.root, a, b, c):
        assert encids(engine, cg).usage == misc(engine, cg).usage
    allocator.release_holder(7)
    allocator.release_holder(8)
    assert encids(engine, h.root).usage == misc(engine, h.root).usage == [0, 0, 0]


def test_a_type_without_capacity_is_einval_in_the_allocator(engine, tree):
    _, b, _ = tree
    engine.hierarchy.procs.attach(7, b)
    with pytest.raises(OSError) as refused:
        engine.allocator.allocate(7, "tdx", 1)
    assert refused.value.errno == errno.EINVAL
    assert misc(engine, b).events_local == [0, 0, 0]


# Where a refused charge counts, misc's (events, events_local) of the refusing cgroup, on each
# side of the kernels that changed it: nowhere before misc.events (5.16), events.local from 6.11.
@pytest.mark.parametrize("version, counted", [
    ((5, 13), (0, 0)), ((5, 15), (0, 0)), ((5, 16), (1, 0)), ((6, 10), (1, 0)),
    ((6, 11), (1, 1)), ((6, 16), (1, 1)),
])
def test_an_older_kernel_counts_a_refusal_where_it_had_files(version, counted):
    engine = new_engine({"sev": 10}, controllers=(EncidsController, MiscController),
                        kernel=KernelInterface(version))
    h = engine.hierarchy
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    a = h.mkdir(h.root, "a")
    h.procs.attach(7, a)
    h.controller("misc").set_max(a, SEV, 0)
    h.drain_events()
    with pytest.raises(ChargeRefused) as refused:
        engine.allocator.allocate(7, "sev", 1)
    assert (refused.value.controller, refused.value.path) == ("misc", "/a")
    assert (misc(engine, a).events[SEV], misc(engine, a).events_local[SEV]) == counted
    notified = {key for key, _ in h.drain_events()}
    assert notified == {name for name, n in zip(("misc.events", "misc.events.local"), counted)
                        if n}


@pytest.mark.parametrize("version", [(5, 13), (6, 1), (6, 15)])
def test_a_kernel_before_tdx_refuses_a_tdx_charge_as_an_unknown_type(version):
    engine = new_engine({"sev": 10, "tdx": 4}, controllers=(EncidsController, MiscController),
                        kernel=KernelInterface(version))
    h = engine.hierarchy
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    a = h.mkdir(h.root, "a")
    h.procs.attach(7, a)
    with pytest.raises(OSError) as refused:
        engine.allocator.allocate(7, "tdx", 1)
    assert refused.value.errno == errno.EINVAL
    assert "before Linux 6.16" in refused.value.strerror
    assert engine.allocator.holdings() == {}
    assert encids(engine, a).usage == misc(engine, a).usage == [0, 0]
    assert engine.allocator.allocate(7, "sev", 1) == [1]  # the types it has work as ever


def test_from_6_16_misc_has_tdx():
    engine = new_engine({"sev": 10, "tdx": 4}, controllers=(EncidsController, MiscController),
                        kernel=KernelInterface((6, 16)))
    h = engine.hierarchy
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    a = h.mkdir(h.root, "a")
    h.procs.attach(7, a)
    assert engine.allocator.allocate(7, "tdx", 2) == [11, 12]
    assert misc(engine, a).usage == [0, 2]
