"""Threaded subtrees: cgroup.type, thread placement, and the rules of Documentation/admin-guide/
cgroup-v2.rst ("Threads") and kernel/cgroup/cgroup.c, each checked first on this machine's
cgroup2 in scratch cgroups."""

import errno

from errnos import raises_errno
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from encidfs.engine import (
    CGROUP_EVENTS_KEY,
    EncidsController,
    MiscController,
    TreeEvent,
    new_engine,
    snapshot,
)

ENCIDS = 1


def tree(h, *paths):
    """mkdir each path (parents first); the cgroups by path."""
    made = {"/": h.root}
    for path in paths:
        parent, _, name = path.rpartition("/")
        made[path] = h.mkdir(made[parent or "/"], name)
    return made


def types(h, cgs, *paths):
    return [h.type_of(cgs[path]) for path in paths]


def test_a_threaded_child_makes_its_parent_a_thread_root_and_its_siblings_invalid(h):
    cgs = tree(h, "/p", "/p/a", "/p/b", "/p/a/x", "/p/b/y")
    assert types(h, cgs, "/p", "/p/a", "/p/b") == ["domain"] * 3
    h.enable_threaded(cgs["/p/a"])
    assert types(h, cgs, "/p", "/p/a", "/p/b", "/p/a/x", "/p/b/y") == [
        "domain threaded", "threaded", "domain invalid", "domain invalid", "domain invalid"]
    h.enable_threaded(cgs["/p/a"])  # already threaded: nothing to do
    with raises_errno(errno.EOPNOTSUPP):  # its parent is no valid domain
        h.enable_threaded(cgs["/p/b/y"])
    h.enable_threaded(cgs["/p/a/x"])
    assert h.type_of(cgs["/p/a/x"]) == "threaded" and cgs["/p/a/x"].dom is cgs["/p"]
    z = h.mkdir(cgs["/p/a/x"], "z")  # a new child of a threaded cgroup
    assert h.type_of(z) == "domain invalid"
    h.enable_threaded(cgs["/p/b"])
    assert types(h, cgs, "/p/b", "/p/b/y") == ["threaded", "domain invalid"]


def test_threaded_descendants_join_the_new_domain_as_cgroup_enable_threaded_does(engine):
    """/a/b/c threaded below the domain /a/b; then /a turns threaded: every threaded cgroup of
    its subtree takes the root's domain, /a/b (a domain, now invalid) keeps its own.  A
    snapshot keeps the domains so."""
    h = engine.hierarchy
    cgs = tree(h, "/a", "/a/b", "/a/b/c")
    h.enable_threaded(cgs["/a/b/c"])
    h.enable_threaded(cgs["/a"])
    assert (cgs["/a"].dom, cgs["/a/b"].dom, cgs["/a/b/c"].dom) == (h.root, cgs["/a/b"], h.root)
    assert types(h, cgs, "/a", "/a/b", "/a/b/c") == ["threaded", "domain invalid", "threaded"]
    copy = new_engine({"sev": 8})
    snapshot.load(copy.hierarchy, copy.allocator, snapshot.dump(h, engine.allocator))
    assert copy.hierarchy.by_id[cgs["/a/b/c"].id].dom is copy.hierarchy.root
    # A process joins /a/b/c, whose domain is valid: the invalid /a/b between is populated
    # (so on this machine's cgroup2: "domain invalid", "populated 1"), but takes none itself.
    h.procs.attach(10, cgs["/a/b/c"])
    assert cgs["/a/b"].populated and not cgs["/a/b"].procs
    with raises_errno(errno.EOPNOTSUPP):
        h.procs.attach(20, cgs["/a/b"])


def test_removing_the_last_threaded_child_makes_the_parent_a_domain_again(h):
    cgs = tree(h, "/p", "/p/a", "/p/b")
    h.enable_threaded(cgs["/p/a"])
    h.rmdir(cgs["/p/a"])
    assert types(h, cgs, "/p", "/p/b") == ["domain", "domain"]


def test_a_populated_cgroup_or_one_with_domain_controllers_cannot_turn_threaded(h):
    cgs = tree(h, "/p", "/p/a", "/q", "/q/c")
    h.procs.attach(10, cgs["/p/a"])
    with raises_errno(errno.EOPNOTSUPP):
        h.enable_threaded(cgs["/p/a"])
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.write_subtree_control(cgs["/q"], ENCIDS, 0)
    with raises_errno(errno.EOPNOTSUPP):  # its parent cannot be a thread root
        h.enable_threaded(cgs["/q/c"])
    with raises_errno(errno.EOPNOTSUPP):  # it enables a domain controller itself
        h.enable_threaded(cgs["/q"])
    assert h.type_of(cgs["/q"]) == "domain"


def test_a_parent_with_a_populated_domain_child_cannot_be_a_thread_root(h):
    cgs = tree(h, "/r", "/r/p", "/r/q")
    h.procs.attach(10, cgs["/r/p"])
    with raises_errno(errno.EOPNOTSUPP):
        h.enable_threaded(cgs["/r/q"])
    h.procs.attach(10, h.root)
    h.enable_threaded(cgs["/r/q"])
    assert types(h, cgs, "/r", "/r/p", "/r/q") == ["domain threaded", "domain invalid",
                                                   "threaded"]


def test_a_thread_root_may_have_processes_and_gets_them_from_its_subtree(h):
    cgs = tree(h, "/p", "/p/a", "/p/a/x")
    h.procs.attach(10, cgs["/p"])
    h.enable_threaded(cgs["/p/a"])  # processes in the parent are no obstacle
    h.enable_threaded(cgs["/p/a/x"])
    h.procs.attach(20, cgs["/p/a/x"])
    assert h.procs.domain_pids(cgs["/p"]) == [10, 20]
    assert [cgs[p].populated for p in ("/p", "/p/a", "/p/a/x")] == [True, True, True]


def test_moving_into_a_domain_invalid_cgroup_is_eopnotsupp(h):
    cgs = tree(h, "/p", "/p/a", "/p/b")
    h.enable_threaded(cgs["/p/a"])
    with raises_errno(errno.EOPNOTSUPP):
        h.procs.attach(10, cgs["/p/b"])
    with raises_errno(errno.EOPNOTSUPP):
        h.threads.attach_thread(10, 11, cgs["/p/b"], [10, 11])
    assert not h.procs.members and not h.threads.split and not cgs["/p/b"].populated


def test_threads_move_one_at_a_time_within_their_threaded_subtree(h):
    cgs = tree(h, "/p", "/p/a", "/p/a/x", "/q")
    h.enable_threaded(cgs["/p/a"])
    h.enable_threaded(cgs["/p/a/x"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11, 12])
    h.threads.attach_thread(10, 12, cgs["/p/a/x"], [10, 11, 12])
    assert [h.threads.threads_in(cgs[p], 10) for p in ("/p", "/p/a", "/p/a/x")] == [
        [10], [11], [12]]
    assert h.procs.cgroup_of(10) is cgs["/p"]  # where its leader is
    assert h.procs.domain_pids(cgs["/p"]) == [10]
    with raises_errno(errno.EOPNOTSUPP):  # across domains
        h.threads.attach_thread(10, 11, cgs["/q"], [10, 11, 12])
    # Moving the leader: the process is where its leader is.
    h.threads.attach_thread(10, 10, cgs["/p/a/x"], [10, 11, 12])
    assert h.procs.cgroup_of(10) is cgs["/p/a/x"] and not cgs["/p"].procs
    # Back together: the process is no longer split.
    h.threads.attach_thread(10, 11, cgs["/p/a/x"], [10, 11, 12])
    assert 10 not in h.threads.split and cgs["/p/a/x"].procs == {10} and cgs["/p/a"].procs is None


def test_a_process_move_takes_every_thread(h):
    cgs = tree(h, "/p", "/p/a", "/q")
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11])
    h.procs.attach(10, cgs["/q"])
    assert 10 not in h.threads.split and h.procs.cgroup_of(10) is cgs["/q"]
    assert not cgs["/p"].populated and not cgs["/p/a"].populated


def test_a_single_threaded_process_moved_by_its_thread_leaves_its_cgroup_empty(h):
    cgs = tree(h, "/p", "/p/a")
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p"])
    h.drain_events()
    h.threads.attach_thread(10, 10, cgs["/p/a"], [10])
    assert 10 not in h.threads.split and h.procs.cgroup_of(10) is cgs["/p/a"]
    assert cgs["/p"].procs is None
    assert cgs["/p"].populated  # through its threaded child
    assert (CGROUP_EVENTS_KEY, cgs["/p/a"]) in h.drain_events()


def test_new_threads_join_the_leader_and_gone_ones_leave(h):
    cgs = tree(h, "/p", "/p/a")
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11])
    h.threads.set_threads(10, [10, 11, 13])
    assert h.threads.threads_in(cgs["/p"], 10) == [10, 13]
    h.drain_events()
    h.threads.set_threads(10, [10, 13])  # 11 exited: /p/a is empty
    assert 10 not in h.threads.split and not cgs["/p/a"].populated
    assert (CGROUP_EVENTS_KEY, cgs["/p/a"]) in h.drain_events()


def test_when_the_leader_exits_first_its_threads_go_on(h):
    cgs = tree(h, "/p", "/p/a", "/p/b")
    h.enable_threaded(cgs["/p/a"])
    h.enable_threaded(cgs["/p/b"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11, 12])
    h.threads.attach_thread(10, 12, cgs["/p/b"], [10, 11, 12])
    h.threads.set_threads(10, [11, 12])
    assert not cgs["/p"].procs and h.procs.cgroup_of(10) in (cgs["/p/a"], cgs["/p/b"])
    h.procs.exit(10)
    assert not cgs["/p"].populated and not h.procs.members and not h.threads.split


def test_a_child_process_starts_where_the_thread_that_forked_it_is(h):
    cgs = tree(h, "/p", "/p/a")
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11])
    h.procs.fork(10, 20, creator=11)
    h.procs.fork(10, 30)  # the thread that forked is not known: the leader's cgroup
    assert h.procs.cgroup_of(20) is cgs["/p/a"] and h.procs.cgroup_of(30) is cgs["/p"]


def test_the_root_is_a_thread_root_that_keeps_its_domain_children(h):
    cgs = tree(h, "/t", "/d")
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.procs.attach(10, cgs["/d"])  # a populated domain child does not stop the root
    h.enable_threaded(cgs["/t"])
    assert types(h, cgs, "/t", "/d") == ["threaded", "domain"]
    assert cgs["/t"].css[0] is None and cgs["/d"].css[0] is not None
    assert h.controllers_of(cgs["/t"]) == 0
    # A thread of a process at the root moves to its threaded child: split at the root.
    h.threads.attach_thread(30, 31, cgs["/t"], [30, 31])
    assert h.threads.split[30] == {30: h.root, 31: cgs["/t"]} and h.procs.cgroup_of(30) is h.root
    assert h.procs.domain_pids(h.root) == [30] and cgs["/t"].populated
    h.write_subtree_control(h.root, 0, ENCIDS)  # its threaded child has no css to lose


def test_turning_threaded_takes_the_domain_controllers_css_offline(h):
    cgs = tree(h, "/t")
    h.write_subtree_control(h.root, ENCIDS, 0)
    css = cgs["/t"].css[0]
    h.drain_events()
    h.enable_threaded(cgs["/t"])
    assert cgs["/t"].css[0] is None and not css.online
    assert (TreeEvent.FILES, cgs["/t"]) in h.drain_events()


def test_domain_controllers_are_not_enabled_in_a_threaded_subtree(h):
    cgs = tree(h, "/p", "/p/a", "/p/b")
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.enable_threaded(cgs["/p/a"])
    with raises_errno(errno.EOPNOTSUPP):  # the thread root
        h.write_subtree_control(cgs["/p"], ENCIDS, 0)
    with raises_errno(errno.ENOENT):  # a threaded cgroup has no domain controllers
        h.write_subtree_control(cgs["/p/a"], ENCIDS, 0)
    with raises_errno(errno.ENOENT):  # nor a domain invalid one below the thread root
        h.write_subtree_control(cgs["/p/b"], ENCIDS, 0)


def test_charges_from_a_threaded_cgroup_land_at_its_domain(engine):
    h, allocator = engine.hierarchy, engine.allocator
    cgs = tree(h, "/p", "/p/a")
    h.write_subtree_control(h.root, ENCIDS, 0)
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p/a"])
    allocator.allocate(10, "sev", 2)
    encids = h.controllers[0]
    assert encids.effective_css(cgs["/p/a"]) is cgs["/p"].css[0]
    assert cgs["/p"].css[0].usage[0] == 2


def test_freezing_a_threaded_cgroup_covers_the_processes_with_a_thread_there(h):
    cgs = tree(h, "/p", "/p/a")
    h.enable_threaded(cgs["/p/a"])
    h.procs.attach(10, cgs["/p"])
    h.threads.attach_thread(10, 11, cgs["/p/a"], [10, 11])
    h.freezer.set_freeze(cgs["/p/a"], True)
    assert h.freezer.freezing(10) and not h.freezer.frozen(cgs["/p/a"])
    h.freezer.set_stopped(10, True)
    assert h.freezer.frozen(cgs["/p/a"]) and not h.freezer.frozen(cgs["/p"])
    assert h.procs.subtree_pids(cgs["/p"]) == [10]


class ThreadsMachine(RuleBasedStateMachine):
    """Random operations, threads and types included (refusals change nothing): the counters
    always follow from the structure, and a snapshot gives the same engine back."""

    PIDS = (10, 20)
    THREADS = {10: [10, 11, 12], 20: [20]}

    def __init__(self):
        super().__init__()
        self.engine = new_engine({"sev": 4}, controllers=(EncidsController, MiscController))
        self.h = self.engine.hierarchy
        self.threads = {pid: list(tids) for pid, tids in self.THREADS.items()}

    def cgroup(self, data):
        return data.draw(st.sampled_from(sorted(self.h.by_id.values(), key=lambda cg: cg.id)))

    def attempt(self, operation):
        try:
            operation()
        except OSError as error:
            assert error.errno in (errno.EBUSY, errno.EEXIST, errno.EAGAIN, errno.ENOENT,
                                   errno.EOPNOTSUPP), error

    @rule(data=st.data(), name=st.sampled_from("abc"))
    def mkdir(self, data, name):
        self.attempt(lambda: self.h.mkdir(self.cgroup(data), name))

    @rule(data=st.data())
    def rmdir(self, data):
        self.attempt(lambda: self.h.rmdir(self.cgroup(data)))

    @rule(data=st.data())
    def threaded(self, data):
        cg = self.cgroup(data)
        if cg.parent is not None:
            self.attempt(lambda: self.h.enable_threaded(cg))

    @rule(data=st.data(), enable=st.booleans())
    def subtree_control(self, data, enable):
        masks = (ENCIDS, 0) if enable else (0, ENCIDS)
        self.attempt(lambda: self.h.write_subtree_control(self.cgroup(data), *masks))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def attach(self, data, pid):
        self.attempt(lambda: self.h.procs.attach(pid, self.cgroup(data)))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def attach_thread(self, data, pid):
        tid = data.draw(st.sampled_from(self.threads[pid]))
        self.attempt(lambda: self.h.threads.attach_thread(pid, tid, self.cgroup(data),
                                                  self.threads[pid]))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def threads_come_and_go(self, data, pid):
        self.threads[pid] = data.draw(st.lists(st.sampled_from(range(pid, pid + 4)),
                                               min_size=1, unique=True))
        self.h.threads.set_threads(pid, self.threads[pid])

    @rule(pid=st.sampled_from(PIDS))
    def exit(self, pid):
        self.h.procs.exit(pid)
        self.threads[pid] = list(self.THREADS[pid])

    @invariant()
    def counters_follow_from_the_structure(self):
        h = self.h
        for cg in h.subtree(h.root):
            children = list(cg.children.values())
            assert cg.nr_threaded_children == sum(c.is_threaded for c in children)
            assert cg.nr_populated_children == sum(c.populated for c in children)
            assert cg.nr_populated_domain_children == sum(
                c.populated and not c.is_threaded for c in children)
            # A threaded cgroup's domain is an ancestor, not threaded: its parent's, or (for
            # one below a domain invalid cgroup) the one cgroup_enable_threaded() gave it.
            assert cg.dom is cg or (not cg.dom.is_threaded
                                    and cg.dom in cg.ancestors(include_self=False))
            if cg.parent is not None:
                expected = {pid for pid in h.procs.members if cg in h.threads.cgroups_of(pid)}
                assert (cg.procs or set()) == expected
            if h.type_of(cg) == "domain invalid":  # populated only by threaded descendants
                assert not cg.procs
        for pid, placed in h.threads.split.items():
            assert len(set(placed.values())) > 1
            assert len({cg.dom for cg in placed.values()}) == 1
            assert h.procs.cgroup_of(pid) in placed.values()
            if pid in placed:
                assert h.procs.cgroup_of(pid) is placed[pid]
        assert all(cg.parent is not None or pid in h.threads.split
                   for pid, cg in h.procs.members.items())

    @invariant()
    def a_snapshot_gives_back_the_same_engine(self):
        self.h.drain_events()
        data = snapshot.dump(self.h, self.engine.allocator)
        copy = new_engine({"sev": 4}, controllers=(EncidsController, MiscController))
        snapshot.load(copy.hierarchy, copy.allocator, data)
        assert snapshot.dump(copy.hierarchy, copy.allocator) == data
        for a, b in zip(self.h.subtree(self.h.root), copy.hierarchy.subtree(copy.hierarchy.root)):
            assert (a.path, a.nr_threaded_children, a.nr_populated_children,
                    a.nr_populated_domain_children, self.h.type_of(a), sorted(a.procs or ())) == (
                b.path, b.nr_threaded_children, b.nr_populated_children,
                b.nr_populated_domain_children, copy.hierarchy.type_of(b),
                sorted(b.procs or ()))


TestThreads = ThreadsMachine.TestCase
TestThreads.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                database=None)
