"""The encids controller: hierarchical charges with the misc controller's rules, and the
lifetime of csses and cgroups that charges keep alive (dying cgroups, offline csses)."""

import errno
from collections import Counter

import pytest
from errnos import raises_errno

from encidfs.engine import U64_MAX, ChargeRefused, new_engine

ENCIDS = 1  # subtree_control mask of encids, the hierarchy's only controller
SEV, SEV_ES, TDX = 0, 1, 2  # type indexes, in the order of the capacities


@pytest.fixture
def engine():
    return new_engine({"sev": 10, "sev_es": 4, "tdx": 0})


@pytest.fixture
def encids(h):
    return h.controller("encids")


@pytest.fixture
def abc(h):
    """/a/b/c with encids enabled from the root down to b, so that a, b and c all have a css."""
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS, 0)
    b = h.mkdir(a, "b")
    h.write_subtree_control(b, ENCIDS, 0)
    c = h.mkdir(b, "c")
    return a, b, c


def usage(cg, t=SEV):
    return cg.css[0].usage[t]


def events(cg, t=SEV):
    return cg.css[0].events[t]


# -- charging ------------------------------------------------------------------------------------


def test_charge_counts_at_its_css_and_every_ancestor(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 3)
    assert charge.css is c.css[0] and charge.cgroup is c and charge.amount == 3
    assert [usage(cg) for cg in (h.root, a, b, c)] == [3, 3, 3, 3]
    assert [usage(cg, SEV_ES) for cg in (h.root, a, b, c)] == [0, 0, 0, 0]
    assert encids.used(SEV) == 3


def test_uncharge_restores_usage(h, encids, abc):
    a, b, c = abc
    first = encids.try_charge(c, "sev", 3)
    second = encids.try_charge(b, "sev", 2)
    encids.uncharge(first)
    assert [usage(cg) for cg in (h.root, a, b, c)] == [2, 2, 2, 0]
    encids.uncharge(second)
    assert [usage(cg) for cg in (h.root, a, b, c)] == [0, 0, 0, 0]


def test_charge_over_a_middle_limit_is_refused_there(h, encids, abc):
    a, b, c = abc
    encids.set_max(a, SEV, 4)
    encids.try_charge(c, "sev", 3)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(c, "sev", 2)
    assert refused.value.errno == errno.EBUSY
    assert refused.value.path == "/a" and refused.value.resource == "sev"
    # Nothing was applied: not even the levels below the refusing one, checked first.
    assert [usage(cg) for cg in (h.root, a, b, c)] == [3, 3, 3, 3]
    # One event at the refusing level and each ancestor, none below it.
    assert [events(cg) for cg in (h.root, a, b, c)] == [1, 1, 0, 0]


def test_charge_up_to_the_limit_is_accepted(h, encids, abc):
    a, b, c = abc
    encids.set_max(b, SEV, 4)
    encids.try_charge(c, "sev", 4)
    assert usage(b) == 4 and events(b) == 0


def test_refusal_logs_controller_events_for_the_refusing_level_and_ancestors(h, encids, abc):
    a, b, c = abc
    encids.set_max(b, SEV, 0)
    h.drain_events()
    with pytest.raises(ChargeRefused):
        encids.try_charge(c, "sev", 1)
    assert Counter(h.drain_events()) == Counter(
        ("encids.sev.events", cg) for cg in (b, a, h.root))


def test_charge_over_capacity_is_refused_at_the_first_level(h, encids, abc):
    # Every level checks the capacity, so the charged css itself refuses an oversized charge.
    a, b, c = abc
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(c, "sev_es", 5)
    assert refused.value.path == "/a/b/c"
    assert [events(cg, SEV_ES) for cg in (h.root, a, b, c)] == [1, 1, 1, 1]
    assert encids.used(SEV_ES) == 0


def test_capacity_binds_at_the_root_across_siblings(h, encids):
    h.write_subtree_control(h.root, ENCIDS, 0)
    x, y = h.mkdir(h.root, "x"), h.mkdir(h.root, "y")
    encids.try_charge(x, "sev_es", 3)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(y, "sev_es", 2)
    assert refused.value.path == "/"
    assert (usage(y, SEV_ES), events(y, SEV_ES), events(h.root, SEV_ES)) == (0, 0, 1)
    encids.try_charge(y, "sev_es", 1)
    assert encids.used(SEV_ES) == 4


def test_limit_below_usage_is_accepted_and_refuses_later_charges(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 5)
    encids.set_max(b, SEV, 2)
    assert b.css[0].max[SEV] == 2 and usage(b) == 5  # nothing is reclaimed
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(c, "sev", 1)
    assert refused.value.path == "/a/b"
    encids.uncharge(charge)
    encids.try_charge(c, "sev", 2)
    with pytest.raises(ChargeRefused):
        encids.try_charge(c, "sev", 1)


def test_limit_above_capacity_is_accepted_and_capacity_still_binds(h, encids, abc):
    a, b, c = abc
    encids.set_max(c, SEV_ES, 100)
    assert c.css[0].max[SEV_ES] == 100
    encids.try_charge(c, "sev_es", 4)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(c, "sev_es", 1)
    assert refused.value.path == "/a/b/c"  # over the capacity before any ancestor is consulted


def test_zero_charge_succeeds_even_over_a_lowered_limit(h, encids, abc):
    # misc_cg_try_charge() returns 0 for amount 0 before looking at any limit.
    a, b, c = abc
    encids.try_charge(c, "sev", 3)
    encids.set_max(b, SEV, 1)
    encids.try_charge(c, "sev", 0)
    assert usage(c) == 3 and events(b) == 0


def test_unknown_type_is_einval(h, encids, abc):
    with raises_errno(errno.EINVAL):
        encids.try_charge(abc[2], "sev_snp", 1)
    with raises_errno(errno.EINVAL):
        encids.types.index("sev_snp")


def test_type_without_capacity_is_einval_and_counts_no_event(h, encids, abc):
    a, b, c = abc
    with raises_errno(errno.EINVAL) as refused:
        encids.try_charge(c, "tdx", 1)
    assert not isinstance(refused.value, ChargeRefused)
    assert [events(cg, TDX) for cg in (h.root, a, b, c)] == [0, 0, 0, 0]
    assert encids.used(TDX) == 0


def test_limit_of_a_type_without_capacity_is_einval(h, encids, abc):
    # misc_cg_max_write() refuses a type whose capacity is 0 with EINVAL.
    c = abc[2]
    with raises_errno(errno.EINVAL):
        encids.set_max(c, TDX, 1)
    assert c.css[0].max[TDX] == U64_MAX


def test_limit_of_cgroup_without_css_is_enoent(h, encids):
    a = h.mkdir(h.root, "a")
    with raises_errno(errno.ENOENT):
        encids.set_max(a, SEV, 1)


def test_charge_in_cgroup_without_css_goes_to_nearest_ancestor_with_one(h, encids, abc):
    # c does not enable encids, so c/d has no css: its processes are accounted to c.
    a, b, c = abc
    d = h.mkdir(c, "d")
    e = h.mkdir(d, "e")
    assert d.css[0] is None and e.css[0] is None
    charge = encids.try_charge(e, "sev", 2)
    assert charge.css is c.css[0] and h.effective_css(e, encids) is c.css[0]
    assert [usage(cg) for cg in (h.root, a, b, c)] == [2, 2, 2, 2]


def test_charge_with_nothing_enabled_goes_to_the_root(h, encids):
    a = h.mkdir(h.root, "a")
    charge = encids.try_charge(a, "sev", 1)
    assert charge.css is h.root.css[0] and encids.used(SEV) == 1


def test_limits_of_a_nearest_ancestor_apply_to_charges_from_below(h, encids, abc):
    a, b, c = abc
    d = h.mkdir(c, "d")
    encids.set_max(c, SEV, 1)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(d, "sev", 2)
    assert refused.value.path == "/a/b/c"


def test_charge_stays_with_its_css_after_the_process_moves(h, encids, abc):
    a, b, c = abc
    other = h.mkdir(h.root, "other")
    h.procs.attach(1, c)
    charge = encids.try_charge(h.procs.cgroup_of(1), "sev", 2)
    h.procs.attach(1, other)
    assert charge.css is c.css[0]
    assert (usage(c), usage(other), usage(h.root)) == (2, 0, 2)
    h.procs.exit(1)
    assert usage(c) == 2
    encids.uncharge(charge)
    assert (usage(c), usage(other), usage(h.root)) == (0, 0, 0)


def test_new_css_starts_with_no_usage_and_no_limit(h, encids, abc):
    css = abc[2].css[0]
    assert (css.usage, css.max, css.events) == ([0, 0, 0], [U64_MAX] * 3, [0, 0, 0])


# -- css and cgroup lifetime ---------------------------------------------------------------------


def test_css_nr_descendants_counts_online_descendant_csses(h, encids, abc):
    a, b, c = abc
    h.mkdir(c, "no_css")
    root_css, a_css = h.root.css[0], a.css[0]
    assert (root_css.nr_descendants, a_css.nr_descendants, c.css[0].nr_descendants) == (3, 2, 0)
    charge = encids.try_charge(c, "sev", 1)
    h.write_subtree_control(b, 0, ENCIDS)  # c's css goes offline, pinned by the charge
    assert (root_css.nr_descendants, a_css.nr_descendants, b.css[0].nr_descendants) == (2, 1, 0)
    h.write_subtree_control(b, ENCIDS, 0)
    assert (root_css.nr_descendants, a_css.nr_descendants) == (3, 2)
    encids.uncharge(charge)
    assert (root_css.nr_descendants, a_css.nr_descendants) == (3, 2)


def test_rmdir_with_charges_leaves_a_dying_cgroup(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 3)
    c_css = c.css[0]
    h.rmdir(c)
    assert c.dying and not c_css.online and c.css[0] is None
    assert [cg.nr_descendants for cg in (h.root, a, b)] == [2, 1, 0]
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [1, 1, 1]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [1, 1, 1, 1]
    # The dying css still counts its IDs, and so do its ancestors until the uncharge.
    assert (c_css.usage[SEV], usage(b), usage(a), usage(h.root)) == (3, 3, 3, 3)
    encids.uncharge(charge)
    assert [usage(cg) for cg in (h.root, a, b)] == [0, 0, 0]
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [0, 0, 0]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [0, 0, 0, 0]


def test_charges_of_a_dying_cgroup_still_count_against_ancestor_limits(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 3)
    h.rmdir(c)
    encids.set_max(b, SEV, 4)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(b, "sev", 2)
    assert refused.value.path == "/a/b"
    encids.uncharge(charge)
    encids.try_charge(b, "sev", 2)


def test_dying_parent_stays_dying_until_its_dying_child_is_uncharged(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 1)
    h.rmdir(c)
    h.rmdir(b)  # a dying child does not keep its parent from being removed
    assert b.dying and c.dying
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [2, 2, 1]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [2, 2, 2, 1]
    assert usage(a) == 1
    encids.uncharge(charge)
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [0, 0, 0]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a)] == [0, 0]
    assert (a.nr_descendants, usage(a), usage(h.root)) == (0, 0, 0)


def test_dying_cgroup_name_can_be_reused_at_once(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 1)
    h.rmdir(c)
    again = h.mkdir(b, "c")
    assert again is not c and again.css[0] is not charge.css
    assert (usage(again), b.nr_descendants, b.nr_dying_descendants) == (0, 1, 1)
    encids.uncharge(charge)
    assert (usage(b), b.nr_descendants, b.nr_dying_descendants) == (0, 1, 0)


def test_disabling_while_a_child_css_holds_charges_leaves_an_offline_css(h, encids, abc):
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 3)
    old = c.css[0]
    encids.set_max(c, SEV, 5)
    h.write_subtree_control(b, 0, ENCIDS)
    assert not old.online and c.css[0] is None and not c.dying
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [1, 1, 1, 1]
    assert [usage(cg) for cg in (h.root, a, b)] == [3, 3, 3]  # ancestors keep the usage
    # While disabled, c's new charges go to b, the nearest css.
    assert encids.try_charge(c, "sev", 1).css is b.css[0]
    assert usage(b) == 4

    h.write_subtree_control(b, ENCIDS, 0)
    fresh = c.css[0]
    assert fresh is not old and fresh.online and fresh.parent is b.css[0]
    assert (fresh.usage[SEV], fresh.max[SEV]) == (0, U64_MAX)
    assert old.usage[SEV] == 3 and old.max[SEV] == 5
    assert c.nr_dying_subsys[0] == 1  # the old css is still pinned

    encids.uncharge(charge)
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [0, 0, 0, 0]
    assert [usage(cg) for cg in (h.root, a, b, c)] == [1, 1, 1, 0]
    assert old.usage[SEV] == 0
    assert h.root.css[0].nr_descendants == 3


def test_offline_css_of_a_removed_cgroup_pins_the_cgroup(h, encids, abc):
    # c's css went offline with charges; removing c then leaves c dying until the uncharge.
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 2)
    h.write_subtree_control(b, 0, ENCIDS)
    h.rmdir(c)
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [1, 1, 1]
    assert b.nr_dying_subsys[0] == 1
    encids.uncharge(charge)
    assert [cg.nr_dying_descendants for cg in (h.root, a, b)] == [0, 0, 0]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b)] == [0, 0, 0]
    assert encids.used(SEV) == 0


def test_offline_chain_releases_bottom_up_after_grandparent_disables(h, encids, abc):
    # Disable encids all the way up while c's css holds a charge: the whole old chain goes
    # offline; re-enabling builds a fresh chain; the old charge still walks the old one.
    a, b, c = abc
    charge = encids.try_charge(c, "sev", 2)
    old_chain = (a.css[0], b.css[0], c.css[0])
    h.write_subtree_control(b, 0, ENCIDS)
    h.write_subtree_control(a, 0, ENCIDS)
    h.write_subtree_control(h.root, 0, ENCIDS)
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [3, 3, 2, 1]
    assert usage(h.root) == 2
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.write_subtree_control(a, ENCIDS, 0)
    h.write_subtree_control(b, ENCIDS, 0)
    assert all(cg.css[0] is not old for cg, old in zip((a, b, c), old_chain))
    assert [usage(cg) for cg in (a, b, c)] == [0, 0, 0]
    encids.uncharge(charge)
    assert [css.usage[SEV] for css in old_chain] == [0, 0, 0]
    assert [cg.nr_dying_subsys[0] for cg in (h.root, a, b, c)] == [0, 0, 0, 0]
    assert usage(h.root) == 0 and h.root.css[0].nr_descendants == 3


@pytest.mark.slow
def test_a_dying_chain_10000_deep_is_released_by_its_last_uncharge(h, encids, allocator):
    # A delegatee's worst case: +encids at every level of a deep chain, a charge at the bottom,
    # the holder moved out and the chain removed; the last uncharge releases all of it at once.
    depth = 10_000
    cg = h.root
    for _ in range(depth):
        h.write_subtree_control(cg, ENCIDS, 0)
        cg = h.mkdir(cg, "c")
    h.procs.attach(100, cg)
    ids = allocator.allocate(100, "sev", 1)
    h.procs.attach(100, h.root)
    chain = list(cg.ancestors())[:-1]
    for node in chain:
        h.rmdir(node)
    assert h.root.nr_dying_descendants == depth
    assert h.root.nr_dying_subsys[0] == depth
    allocator.free(ids)
    assert h.root.nr_dying_descendants == 0 and h.root.nr_dying_subsys[0] == 0
    assert all(node.refs == 0 for node in chain)
    assert h.root.css[0].nr_descendants == 0 and encids.used(SEV) == 0
    assert allocator.allocate(100, "sev", 1) == ids  # the ID is back in the pool
