"""cgroup.stat.local's frozen_usec: the time a cgroup spent freezing (its own cgroup.freeze or
an ancestor's), frozen or not, as the kernel's freeze_start_nsec and frozen_nsec count it.
Checked on this machine's cgroup2: a child counts its parent's freeze, one made in a freezing
parent counts from its mkdir, and a thawed cgroup keeps its total."""

from encidfs.engine import new_engine, snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now

    def advance(self, usec: int) -> None:
        self.now += usec * 1000


def hierarchy(clock):
    h = new_engine({"sev": 4}).hierarchy
    h.clock = clock
    return h


def test_freezing_time_counts_below_and_stays_after_a_thaw():
    clock = Clock()
    h = hierarchy(clock)
    a = h.mkdir(h.root, "a")
    b = h.mkdir(a, "b")
    h.freezer.set_freeze(a, True)
    clock.advance(300)
    assert (h.freezer.frozen_usec(a), h.freezer.frozen_usec(b)) == (300, 300)
    h.freezer.set_freeze(b, True)  # already freezing through a: nothing new starts
    h.freezer.set_freeze(a, False)  # b freezes by itself now, without a break
    clock.advance(100)
    assert (h.freezer.frozen_usec(a), h.freezer.frozen_usec(b)) == (300, 400)
    h.freezer.set_freeze(b, False)
    clock.advance(1000)
    assert (h.freezer.frozen_usec(a), h.freezer.frozen_usec(b)) == (300, 400)


def test_a_cgroup_made_in_a_freezing_parent_counts_from_its_mkdir():
    clock = Clock()
    h = hierarchy(clock)
    a = h.mkdir(h.root, "a")
    h.freezer.set_freeze(a, True)
    clock.advance(50)
    c = h.mkdir(a, "c")
    clock.advance(100)
    assert h.freezer.frozen_usec(c) == 100


def test_replayed_changes_count_from_when_they_were_made():
    clock = Clock()
    h = hierarchy(clock)
    a = h.mkdir(h.root, "a")
    start = clock.now
    clock.advance(500)
    h.freezer.set_freeze(a, True, at=start)  # a journal's record, replayed later
    c = h.mkdir(a, "c", at=start + 200_000)
    assert (h.freezer.frozen_usec(a), h.freezer.frozen_usec(c)) == (500, 300)


def test_a_snapshot_keeps_the_time_and_goes_on_counting():
    clock = Clock()
    engine = new_engine({"sev": 4})
    h = engine.hierarchy
    h.clock = clock
    a = h.mkdir(h.root, "a")
    h.freezer.set_freeze(a, True)
    clock.advance(200)
    h.freezer.set_freeze(a, False)
    h.freezer.set_freeze(a, True)
    clock.advance(100)
    data = snapshot.dump(h, engine.allocator)
    copy = new_engine({"sev": 4})
    copy.hierarchy.clock = clock
    snapshot.load(copy.hierarchy, copy.allocator, data)
    clock.advance(50)
    assert copy.hierarchy.freezer.frozen_usec(copy.hierarchy.by_id[a.id]) == 350
