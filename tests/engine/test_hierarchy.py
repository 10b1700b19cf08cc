"""The cgroup v2 core rules: mkdir/rmdir, cgroup.subtree_control, process attachment, populated."""

import errno
import sys
from collections import Counter

import pytest
from errnos import raises_errno

from encidfs.engine import CGROUP_EVENTS_KEY, ChargeRefused, TreeEvent, new_engine

ENCIDS = 1  # subtree_control mask of encids, the hierarchy's only controller


def new_hierarchy(capacities):
    return new_engine(capacities).hierarchy


def chain(h, parent, *names):
    """mkdir parent/names[0]/names[1]/...; returns the cgroups created."""
    made = []
    for name in names:
        parent = h.mkdir(parent, name)
        made.append(parent)
    return made


def events_logged(h):
    return Counter(cg.path for change, cg in h.drain_events() if change == CGROUP_EVENTS_KEY)


def populated_map(h):
    """populated of every live cgroup, keyed by path."""
    out, stack = {}, [h.root]
    while stack:
        cg = stack.pop()
        out[cg.path] = cg.populated
        stack.extend(cg.children.values())
    return out


# -- mkdir ---------------------------------------------------------------------------------------


def test_mkdir_duplicate_name_is_eexist(h):
    a = h.mkdir(h.root, "a")
    with raises_errno(errno.EEXIST):
        h.mkdir(h.root, "a")
    assert h.root.children == {"a": a}
    assert h.root.nr_descendants == 1


def test_mkdir_duplicate_name_is_eexist_even_at_a_limit(h):
    # The VFS finds the existing dentry and fails with EEXIST before cgroup_mkdir() runs, so the
    # hierarchy limits (EAGAIN) are never consulted for a name that is taken.
    h.mkdir(h.root, "a")
    h.set_max_descendants(h.root, 1)
    with raises_errno(errno.EEXIST):
        h.mkdir(h.root, "a")


@pytest.mark.parametrize("name", ["a\nb", "\n", "trailing\n"])
def test_mkdir_name_with_newline_is_einval(h, name):
    with raises_errno(errno.EINVAL):
        h.mkdir(h.root, name)
    assert h.root.children == {}


def test_mkdir_refused_when_parent_reaches_max_descendants(h):
    a = h.mkdir(h.root, "a")
    h.set_max_descendants(a, 2)
    h.mkdir(a, "x")
    h.mkdir(a, "y")
    with raises_errno(errno.EAGAIN):
        h.mkdir(a, "z")
    assert a.nr_descendants == 2
    assert "z" not in a.children


def test_mkdir_refused_when_higher_ancestor_reaches_max_descendants(h):
    # max_descendants of the root counts grandchildren too, and binds deep below it.
    a, b = chain(h, h.root, "a", "b")
    h.set_max_descendants(h.root, 3)
    h.mkdir(b, "c")
    with raises_errno(errno.EAGAIN):
        h.mkdir(a, "d")
    with raises_errno(errno.EAGAIN):
        h.mkdir(b, "d")
    assert h.root.nr_descendants == 3


def test_max_descendants_counts_live_descendants_only(h):
    a = h.mkdir(h.root, "a")
    h.set_max_descendants(a, 1)
    h.rmdir(h.mkdir(a, "x"))
    assert a.nr_descendants == 0
    h.mkdir(a, "y")  # the removed child freed its slot


def test_max_depth_0_refuses_any_child(h):
    x = h.mkdir(h.root, "x")
    h.set_max_depth(x, 0)
    with raises_errno(errno.EAGAIN):
        h.mkdir(x, "child")


def test_max_depth_1_allows_children_but_no_grandchildren(h):
    x = h.mkdir(h.root, "x")
    h.set_max_depth(x, 1)
    child = h.mkdir(x, "child")
    with raises_errno(errno.EAGAIN):
        h.mkdir(child, "grandchild")


def test_max_depth_is_relative_to_the_ancestor_that_sets_it(h):
    # X sits at level 2; max_depth 2 allows X/a/b (2 below X) but not X/a/b/c (3 below X).
    x = h.mkdir(h.mkdir(h.root, "p"), "x")
    h.set_max_depth(x, 2)
    _, b = chain(h, x, "a", "b")
    assert b.level == 4
    with raises_errno(errno.EAGAIN):
        h.mkdir(b, "c")


def test_max_depth_of_root_limits_absolute_depth(h):
    h.set_max_depth(h.root, 2)
    _, b = chain(h, h.root, "a", "b")
    with raises_errno(errno.EAGAIN):
        h.mkdir(b, "c")


def test_refused_mkdir_changes_no_counter(h):
    a = h.mkdir(h.root, "a")
    h.set_max_depth(a, 0)
    h.drain_events()
    with raises_errno(errno.EAGAIN):
        h.mkdir(a, "x")
    assert (h.root.nr_descendants, a.nr_descendants, a.children) == (1, 0, {})
    assert h.drain_events() == []


def test_nr_descendants_counts_live_descendants_at_every_ancestor(h):
    a, b, c = chain(h, h.root, "a", "b", "c")
    h.mkdir(a, "sibling")
    assert [cg.nr_descendants for cg in (h.root, a, b, c)] == [4, 3, 1, 0]
    h.rmdir(c)
    assert [cg.nr_descendants for cg in (h.root, a, b)] == [3, 2, 0]


# -- rmdir ---------------------------------------------------------------------------------------


def test_rmdir_of_root_is_ebusy(h):
    with raises_errno(errno.EBUSY):
        h.rmdir(h.root)


def test_rmdir_of_populated_cgroup_is_ebusy(h):
    a = h.mkdir(h.root, "a")
    h.procs.attach(1, a)
    with raises_errno(errno.EBUSY):
        h.rmdir(a)
    assert not a.dying and h.root.children == {"a": a}


def test_rmdir_of_cgroup_with_children_is_ebusy(h):
    a, _ = chain(h, h.root, "a", "b")
    with raises_errno(errno.EBUSY):
        h.rmdir(a)
    assert h.root.nr_descendants == 2


def test_rmdir_of_cgroup_populated_only_below_is_ebusy(h):
    a, b = chain(h, h.root, "a", "b")
    h.procs.attach(1, b)
    with raises_errno(errno.EBUSY):
        h.rmdir(a)


def test_rmdir_logs_removed_and_frees_the_name_at_once(h):
    a = h.mkdir(h.root, "a")
    h.drain_events()
    h.rmdir(a)
    assert h.drain_events() == [(TreeEvent.REMOVED, a)]
    again = h.mkdir(h.root, "a")
    assert again is not a and again.id != a.id
    assert h.root.children == {"a": again}


def test_operations_on_a_removed_cgroup_are_enodev(h):
    a = h.mkdir(h.root, "a")
    h.rmdir(a)
    operations = [
        lambda: h.mkdir(a, "x"),
        lambda: h.rmdir(a),
        lambda: h.write_subtree_control(a, ENCIDS, 0),
        lambda: h.write_subtree_control(a, 0, ENCIDS),
        lambda: h.procs.attach(1, a),
        lambda: h.set_max_depth(a, 1),
        lambda: h.set_max_descendants(a, 1),
        lambda: h.freezer.set_freeze(a, True),
    ]
    for operation in operations:
        with raises_errno(errno.ENODEV):
            operation()
    assert h.procs.members == {}


def test_removed_cgroup_without_pins_is_released_at_once(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a, b = chain(h, h.root, "a", "b")
    h.rmdir(b)
    assert (a.nr_descendants, a.nr_dying_descendants, a.nr_dying_subsys) == (0, 0, [0])
    assert h.root.nr_dying_descendants == 0


# -- cgroup.subtree_control ------------------------------------------------------------------


def test_enabling_what_the_parent_does_not_offer_is_enoent(h):
    a = h.mkdir(h.root, "a")
    assert h.controllers_of(a) == 0
    with raises_errno(errno.ENOENT):
        h.write_subtree_control(a, ENCIDS, 0)
    assert a.subtree_control == 0


def test_root_offers_every_controller(h):
    assert h.controllers_of(h.root) == ENCIDS
    h.write_subtree_control(h.root, ENCIDS, 0)
    assert h.root.subtree_control == ENCIDS


def test_enabling_in_non_root_cgroup_with_processes_is_ebusy(h):
    # The no-internal-process rule: children's controllers must not compete with these PIDs.
    h.write_subtree_control(h.root, ENCIDS, 0)
    a, b = chain(h, h.root, "a", "b")
    h.procs.attach(1, a)
    with raises_errno(errno.EBUSY):
        h.write_subtree_control(a, ENCIDS, 0)
    assert a.subtree_control == 0 and b.css[0] is None


def test_root_enables_controllers_with_processes_in_it(h):
    # The root is exempt from the no-internal-process rule; every process starts in it.
    a = h.mkdir(h.root, "a")
    h.procs.attach(1, a)
    h.procs.attach(1, h.root)
    h.write_subtree_control(h.root, ENCIDS, 0)
    assert a.css[0] is not None


def test_disabling_is_allowed_while_processes_are_attached(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a, b = chain(h, h.root, "a", "b")
    h.write_subtree_control(a, ENCIDS, 0)
    h.procs.attach(1, b)
    h.write_subtree_control(a, 0, ENCIDS)
    h.write_subtree_control(h.root, 0, ENCIDS)
    assert (a.subtree_control, h.root.subtree_control) == (0, 0)
    assert b.procs == {1}


def test_disabling_while_a_child_still_enables_it_is_ebusy(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS, 0)
    with raises_errno(errno.EBUSY):
        h.write_subtree_control(h.root, 0, ENCIDS)
    assert h.root.subtree_control == ENCIDS and a.css[0].online


def test_redundant_enable_or_disable_is_a_noop_success(h):
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(h.root, 0, ENCIDS)  # not enabled: nothing to disable
    h.write_subtree_control(h.root, ENCIDS, 0)
    css = a.css[0]
    h.drain_events()
    h.write_subtree_control(h.root, ENCIDS, 0)  # already enabled
    assert a.css[0] is css and css.online
    assert h.drain_events() == []


def test_enabling_gives_each_live_child_a_css(h):
    children = [h.mkdir(h.root, name) for name in "abc"]
    h.rmdir(children.pop())
    h.write_subtree_control(h.root, ENCIDS, 0)
    for child in children:
        css = child.css[0]
        assert css.online and css.cgroup is child and css.parent is h.root.css[0]
    assert h.root.css[0].nr_descendants == 2


def test_disabling_takes_the_children_css_offline(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    css = a.css[0]
    h.write_subtree_control(h.root, 0, ENCIDS)
    assert a.css[0] is None and not css.online
    assert h.root.css[0].nr_descendants == 0
    assert a.nr_dying_subsys == [0]  # nothing pinned it: released at once


def test_subtree_control_change_logs_files_for_each_child(h):
    a, b = h.mkdir(h.root, "a"), h.mkdir(h.root, "b")
    h.mkdir(a, "grandchild")  # gets no css: a does not enable encids
    h.drain_events()
    h.write_subtree_control(h.root, ENCIDS, 0)
    files = [(TreeEvent.FILES, a), (TreeEvent.FILES, b)]
    assert Counter(h.drain_events()) == Counter(files)
    h.write_subtree_control(h.root, 0, ENCIDS)
    assert Counter(h.drain_events()) == Counter(files)


def test_mkdir_under_an_enabling_parent_gets_a_css(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    b = h.mkdir(a, "b")
    assert a.css[0].parent is h.root.css[0]
    assert b.css[0] is None


# -- processes -----------------------------------------------------------------------------------


def test_attach_into_cgroup_enabling_controllers_is_ebusy(h):
    h.write_subtree_control(h.root, ENCIDS, 0)
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, ENCIDS, 0)
    with raises_errno(errno.EBUSY):
        h.procs.attach(1, a)
    assert h.procs.members == {} and a.procs is None


def test_root_accepts_processes_whatever_it_enables(h):
    a = h.mkdir(h.root, "a")
    h.procs.attach(1, a)
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.procs.attach(1, h.root)
    assert h.procs.cgroup_of(1) is h.root
    assert h.procs.members == {} and a.procs is None


def test_attach_moves_the_process(h):
    a, b = h.mkdir(h.root, "a"), h.mkdir(h.root, "b")
    h.procs.attach(1, a)
    h.procs.attach(2, a)
    h.procs.attach(1, b)
    assert h.procs.members == {1: b, 2: a}
    assert (a.procs, b.procs) == ({2}, {1})
    h.procs.attach(2, b)
    assert a.procs is None and b.procs == {1, 2}


def test_attach_to_current_cgroup_changes_nothing(h):
    a = h.mkdir(h.root, "a")
    h.procs.attach(1, a)
    h.drain_events()
    h.procs.attach(1, a)
    assert a.procs == {1} and h.drain_events() == []


def test_populated_propagates_to_all_ancestors_and_back_on_exit(h):
    a, b, c = chain(h, h.root, "a", "b", "c")
    h.procs.attach(1, c)
    assert all(cg.populated for cg in (h.root, a, b, c))
    assert [cg.nr_populated_children for cg in (h.root, a, b, c)] == [1, 1, 1, 0]
    h.procs.exit(1)
    assert not any(cg.populated for cg in (h.root, a, b, c))
    assert h.procs.members == {} and c.procs is None


def test_populated_follows_a_moving_process(h):
    a, b = chain(h, h.root, "a", "b")
    other = h.mkdir(h.root, "other")
    h.procs.attach(1, b)
    h.procs.attach(1, other)
    assert [cg.populated for cg in (h.root, a, b, other)] == [True, False, False, True]


def test_exit_of_a_pid_in_the_root_is_ignored(h):
    h.procs.exit(42)
    assert h.procs.members == {} and h.drain_events() == []


def test_events_logged_for_cgroups_whose_populated_flipped_on_attach_and_exit(h):
    a, b = chain(h, h.root, "a", "b")
    h.drain_events()
    h.procs.attach(1, b)
    assert events_logged(h) == Counter({"/a/b": 1, "/a": 1, "/": 1})
    h.procs.attach(2, b)  # already populated: nothing flips
    assert events_logged(h) == Counter()
    h.procs.exit(1)
    assert events_logged(h) == Counter()
    h.procs.exit(2)
    assert events_logged(h) == Counter({"/a/b": 1, "/a": 1, "/": 1})


@pytest.mark.parametrize(
    "src, dst",
    [
        ("/a/x", "/a/y"),  # siblings: /a and / stay populated throughout
        ("/a/x", "/a"),  # up to the parent
        ("/a", "/a/x"),  # down to a child
        ("/a/x", "/b"),  # to a cousin: /a empties, /b fills, / stays populated
    ],
)
def test_move_logs_events_for_exactly_the_cgroups_whose_populated_flipped(h, src, dst):
    # The kernel populates the destination before it empties the source (css_set_move_task()),
    # so a common ancestor never flips and gets no cgroup.events notification.
    a = h.mkdir(h.root, "a")
    cgroups = {"/a": a, "/a/x": h.mkdir(a, "x"), "/a/y": h.mkdir(a, "y")}
    cgroups["/b"] = h.mkdir(h.root, "b")
    h.procs.attach(1, cgroups[src])
    before = populated_map(h)
    h.drain_events()
    h.procs.attach(1, cgroups[dst])
    after = populated_map(h)
    flipped = Counter(path for path in after if after[path] != before[path])
    assert events_logged(h) == flipped


# -- scaling -------------------------------------------------------------------------------------


def build_tree(h, leaves_per_level):
    """Four chains of depth 64 with encids enabled along them, `leaves_per_level` leaves hung
    under every chain node; returns the level-63 node of the first chain."""
    h.write_subtree_control(h.root, ENCIDS, 0)
    deepest = []
    for c in range(4):
        node = h.root
        for _ in range(1, 64):
            node = h.mkdir(node, f"c{c}")
            h.write_subtree_control(node, ENCIDS, 0)
            for leaf in range(leaves_per_level):
                h.mkdir(node, f"l{leaf}")
        deepest.append(node)
    return deepest[0]


def traced_lines(operation):
    """How many Python lines `operation` executes: a deterministic measure of the work done."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = operation()
    finally:
        sys.settrace(previous)
    return count, result


def deep_operations(h, parent):
    """mkdir, charge, uncharge and rmdir at level 64; the work each did, in traced lines."""
    encids = h.controller("encids")
    mkdir_work, cg = traced_lines(lambda: h.mkdir(parent, "deep"))
    charge_work, charge = traced_lines(lambda: encids.try_charge(cg, "sev", 1))
    assert cg.level == 64 and charge.css is cg.css[0]
    uncharge_work, _ = traced_lines(lambda: encids.uncharge(charge))
    rmdir_work, _ = traced_lines(lambda: h.rmdir(cg))
    return mkdir_work, charge_work, uncharge_work, rmdir_work


def test_operations_at_depth_64_do_the_same_work_with_20k_cgroups_as_with_1k():
    # Work depends on the depth only: every operation walks its ancestors, never the tree.
    small, large = new_hierarchy({"sev": 8}), new_hierarchy({"sev": 8})
    small_parent = build_tree(small, 3)
    large_parent = build_tree(large, 79)
    assert small.root.nr_descendants == 4 * 63 * 4  # 1,008 cgroups
    assert large.root.nr_descendants == 4 * 63 * 80  # 20,160 cgroups
    assert large.root.css[0].nr_descendants == 4 * 63 * 80

    work = deep_operations(small, small_parent)
    assert min(work) > 0  # the tracer saw the operations
    assert deep_operations(large, large_parent) == work

    # Correctness at that size: a deep charge reaches the root, is refused at a deep limit.
    encids = large.controller("encids")
    charge = encids.try_charge(large_parent, "sev", 3)
    assert encids.used(0) == 3
    encids.set_max(large_parent.parent, 0, 3)
    with pytest.raises(ChargeRefused) as refused:
        encids.try_charge(large_parent, "sev", 1)
    assert refused.value.path == large_parent.parent.path
    encids.uncharge(charge)
    assert encids.used(0) == 0
    assert large.root.nr_descendants == 4 * 63 * 80
    assert large.root.nr_dying_descendants == 0


def test_a_freeze_that_an_ancestor_decides_still_notifies_the_cgroup(h):
    """cgroup_freeze(): a write that changes no cgroup's effective state notifies the cgroup
    itself ("nothing to wait for"); one that changes nothing at all notifies nobody."""
    a, b = chain(h, h.root, "a", "b")
    h.freezer.set_freeze(a, True)
    assert events_logged(h) == Counter({"/a": 1, "/a/b": 1})  # both frozen (no processes)
    h.freezer.set_freeze(b, True)
    assert events_logged(h) == Counter({"/a/b": 1})
    h.freezer.set_freeze(b, True)
    assert events_logged(h) == Counter()
    h.freezer.set_freeze(b, False)
    assert events_logged(h) == Counter({"/a/b": 1})
    h.freezer.set_freeze(a, False)
    assert events_logged(h) == Counter({"/a": 1, "/a/b": 1})
