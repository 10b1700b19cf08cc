"""Random operation sequences checked against a small model of the engine.

The model keeps what the engine must agree with: the live paths, where each PID is, which
cgroups enable encids, the limits written and the live charges.  After every step the counters
are checked against walks over that state, and every refused operation must have left the
engine as it was (except the events counters, which a refused charge increments by design).
"""

import errno
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from encidfs.engine import INT_MAX, U64_MAX, ChargeRefused, new_engine

ENCIDS = 1
CAPACITIES = {"sev": 12, "sev_es": 4, "tdx": 0}
TYPES = list(CAPACITIES)
CAPACITY = list(CAPACITIES.values())
NAMES = ("a", "b", "c")
PIDS = range(1, 6)


def live_cgroups(h):
    out, stack = [], [h.root]
    while stack:
        cg = stack.pop()
        out.append(cg)
        stack.extend(cg.children.values())
    return out


def css_chain(css):
    while css is not None:
        yield css
        css = css.parent


def is_below(cg, ancestor):
    """cg is ancestor or one of its descendants (live or dying: parent links never change)."""
    return any(node is ancestor for node in cg.ancestors())


def snapshot(h, charges):
    """The engine's state, split into the events counters and the rest.  Covers the live
    cgroups, and the csses and dying cgroups that live charges keep."""
    cgroups = {cg.id: cg for cg in live_cgroups(h)}
    csses = {id(cg.css[0]): cg.css[0] for cg in cgroups.values() if cg.css[0] is not None}
    for charge in charges:
        for css in css_chain(charge.css):
            csses[id(css)] = css
            cgroups[css.cgroup.id] = css.cgroup
    state = {
        "members": dict(h.procs.members),
        "stopped": set(h.freezer.stopped),
        "by_id": set(h.by_id),
        "cgroups": {
            cgid: (
                cg.dying, cg.refs, cg.nr_descendants, cg.nr_dying_descendants, cg.subtree_control,
                frozenset(cg.procs or ()), cg.nr_populated_children, tuple(cg.nr_dying_subsys),
                cg.max_depth, cg.max_descendants, cg.freeze, set(cg.children), id(cg.css[0]),
            )
            for cgid, cg in cgroups.items()
        },
        "csses": {
            key: (css.online, css.refs, css.nr_descendants, tuple(css.usage), tuple(css.max))
            for key, css in csses.items()
        },
    }
    return state, {key: tuple(css.events) for key, css in csses.items()}


class EngineMachine(RuleBasedStateMachine):
    # Few, broad rules: hypothesis switches random subsets of rules off for each run, and the
    # interesting states (dying cgroups, offline csses) need mkdir, charge and rmdir together.

    def __init__(self):
        super().__init__()
        self.h = new_engine(CAPACITIES).hierarchy
        self.encids = self.h.controller("encids")
        self.paths = {"/"}  # live cgroups
        self.enabled = set()  # paths whose subtree_control enables encids
        self.pids = {}  # PID -> path, for PIDs outside the root
        self.maxes = {}  # css -> {type: limit written}
        self.charges = []
        self.removed = []  # every cgroup rmdir'ed

    # -- model ----------------------------------------------------------------------------------

    def pick(self, data, include_removed=False, leaves_only=False):
        """A live cgroup, or with include_removed maybe a removed one (to be refused)."""
        choices = sorted(live_cgroups(self.h), key=lambda cg: cg.path)
        if leaves_only and len(choices) > 1:
            choices = [cg for cg in choices if not cg.children and cg.parent is not None]
        if include_removed:
            choices += self.removed[-2:]
        return data.draw(st.sampled_from(choices))

    def populated(self, cg):
        prefix = cg.path.rstrip("/") + "/"
        return any(path == cg.path or path.startswith(prefix) for path in self.pids.values())

    def max_of(self, css, t):
        return self.maxes.get(css, {}).get(t, U64_MAX)

    def model_usage(self, css, t):
        return sum(c.amount for c in self.charges
                   if c.type == t and any(level is css for level in css_chain(c.css)))

    def expected_css_cgroup(self, cg):
        """The nearest ancestor whose parent enables encids (or the root)."""
        return next(node for node in cg.ancestors()
                    if node.parent is None or node.parent.path in self.enabled)

    def attempt(self, operation, expected_errnos):
        """Run operation: it must succeed iff expected_errnos is empty, and a refusal must fail
        with one of them, change nothing and log nothing."""
        before = snapshot(self.h, self.charges)
        changes = list(self.h.events)
        try:
            result = operation()
        except OSError as e:
            assert not isinstance(e, ChargeRefused)  # charges are checked in charge()
            assert e.errno in expected_errnos, (e, expected_errnos)
            assert snapshot(self.h, self.charges) == before
            assert self.h.events == changes
            return e
        assert not expected_errnos, f"expected one of {expected_errnos}, got success"
        return result

    # -- rules ----------------------------------------------------------------------------------

    @initialize(shape=st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=8))
    def start(self, shape):
        """A random starting tree below a root that enables encids, so that runs reach deep
        csses in few steps.  Each entry is (index of the parent among the cgroups made so far,
        whether it enables encids in turn, which it can only if its parent does)."""
        self.h.write_subtree_control(self.h.root, ENCIDS, 0)
        self.enabled.add("/")
        made = [self.h.root]
        for i, (parent_index, enable) in enumerate(shape):
            cg = self.h.mkdir(made[parent_index % len(made)], f"s{i}")
            self.paths.add(cg.path)
            made.append(cg)
            if enable and cg.parent.path in self.enabled:
                self.h.write_subtree_control(cg, ENCIDS, 0)
                self.enabled.add(cg.path)

    @rule(data=st.data(), op=st.sampled_from(["mkdir", "rmdir", "limit"]))
    def tree(self, data, op):
        """mkdir, rmdir, or write cgroup.max.depth or cgroup.max.descendants."""
        {"mkdir": self.mkdir, "rmdir": self.rmdir, "limit": self.set_tree_limit}[op](data)

    @rule(data=st.data(), op=st.sampled_from(["enable", "disable", "max"]))
    def control(self, data, op):
        """Write cgroup.subtree_control or encids.<type>.max."""
        if op == "max":
            self.set_max(data)
        else:
            self.subtree_control(data, op == "enable")

    @rule(data=st.data(), release=st.booleans())
    def charges(self, data, release):
        """Charge a cgroup, or free a live charge."""
        if release and self.charges:
            charge = data.draw(st.sampled_from(self.charges))
            self.charges.remove(charge)
            self.encids.uncharge(charge)
        else:
            self.charge(data)

    @rule(data=st.data(), pid=st.sampled_from(PIDS), leave=st.booleans())
    def process(self, data, pid, leave):
        """A process moves to a cgroup, or exits."""
        if leave:
            self.h.procs.exit(pid)  # never refused
            self.pids.pop(pid, None)
            return
        cg = self.pick(data, include_removed=True)
        if cg.dying:
            expected = {errno.ENODEV}
        elif cg.parent is not None and cg.path in self.enabled:
            expected = {errno.EBUSY}
        else:
            expected = set()
        self.attempt(lambda: self.h.procs.attach(pid, cg), expected)
        if not expected:
            self.pids.pop(pid, None)
            if cg.parent is not None:
                self.pids[pid] = cg.path

    # -- operations, each checked against the model -----------------------------------------

    def mkdir(self, data):
        parent = self.pick(data, include_removed=True)
        name = data.draw(st.sampled_from(NAMES))
        at_limit = any(ancestor.nr_descendants >= ancestor.max_descendants
                       or level > ancestor.max_depth
                       for level, ancestor in enumerate(parent.ancestors(), 1))
        if parent.dying:
            expected = {errno.ENODEV}
        elif name in parent.children:
            expected = {errno.EEXIST}  # the VFS finds the name before any limit is looked at
        elif at_limit:
            expected = {errno.EAGAIN}
        else:
            expected = set()
        cg = self.attempt(lambda: self.h.mkdir(parent, name), expected)
        if not expected:
            self.paths.add(cg.path)
            assert (cg.css[0] is not None) == (parent.path in self.enabled)

    def rmdir(self, data):
        # Leaves half of the time, so that removals succeed and leave dying cgroups behind.
        cg = self.pick(data, include_removed=True, leaves_only=data.draw(st.booleans()))
        if cg.dying:
            expected = {errno.ENODEV}
        elif cg.parent is None or cg.children or self.populated(cg):
            expected = {errno.EBUSY}
        else:
            expected = set()
        self.attempt(lambda: self.h.rmdir(cg), expected)
        if not expected:
            self.paths.remove(cg.path)
            self.enabled.discard(cg.path)
            self.removed.append(cg)

    def subtree_control(self, data, enable):
        cg = self.pick(data, include_removed=True)
        if cg.dying:
            expected = {errno.ENODEV}
        elif enable == (cg.path in self.enabled):
            expected = set()  # nothing to do
        elif enable and cg.parent is not None and cg.parent.path not in self.enabled:
            expected = {errno.ENOENT}
        elif enable and cg.parent is not None and cg.path in self.pids.values():
            expected = {errno.EBUSY}
        elif not enable and any(child.path in self.enabled for child in cg.children.values()):
            expected = {errno.EBUSY}
        else:
            expected = set()
        mask = (ENCIDS, 0) if enable else (0, ENCIDS)
        self.attempt(lambda: self.h.write_subtree_control(cg, *mask), expected)
        if not expected:
            (self.enabled.add if enable else self.enabled.discard)(cg.path)
            assert all((child.css[0] is not None) == enable for child in cg.children.values())

    def set_tree_limit(self, data):
        cg = self.pick(data, include_removed=True)
        setter = data.draw(st.sampled_from([self.h.set_max_depth, self.h.set_max_descendants]))
        value = data.draw(st.one_of(st.integers(0, 3), st.just(INT_MAX)))
        self.attempt(lambda: setter(cg, value), {errno.ENODEV} if cg.dying else set())

    def set_max(self, data):
        cg = self.pick(data)
        if cg.parent is None:
            return  # the root has no encids.<type>.max file, as the misc controller has none
        t = data.draw(st.sampled_from([TYPES.index("sev"), TYPES.index("sev_es")]))
        value = data.draw(st.one_of(st.integers(0, 14), st.just(U64_MAX)))
        css = cg.css[0]
        self.attempt(lambda: self.encids.set_max(cg, t, value), set() if css else {errno.ENOENT})
        if css:
            self.maxes.setdefault(css, {})[t] = value

    def charge(self, data):
        cg = self.pick(data)
        type_name = data.draw(st.sampled_from(["sev", "sev", "sev_es", "tdx", "bogus"]))
        amount = data.draw(st.integers(1, 4))
        if CAPACITIES.get(type_name, 0) == 0:
            self.attempt(lambda: self.encids.try_charge(cg, type_name, amount), {errno.EINVAL})
            return
        t = TYPES.index(type_name)
        css = self.h.effective_css(cg, self.encids)
        assert css.cgroup is self.expected_css_cgroup(cg)
        refusing = next((level for level in css_chain(css)
                         if self.model_usage(level, t) + amount
                         > min(self.max_of(level, t), CAPACITY[t])), None)
        self.h.drain_events()
        before, events_before = snapshot(self.h, self.charges)
        try:
            charge = self.encids.try_charge(cg, type_name, amount)
        except ChargeRefused as refused:
            assert refusing is not None and refused.path == refusing.cgroup.path
            after, events_after = snapshot(self.h, self.charges)
            assert after == before
            # One event at the refusing level and each of its ancestors, none elsewhere.
            counted = {id(level) for level in css_chain(refusing)}
            for key, events in events_after.items():
                expected = list(events_before[key])
                expected[t] += key in counted
                assert list(events) == expected
            assert Counter(self.h.drain_events()) == Counter(
                (f"encids.{type_name}.events", level.cgroup) for level in css_chain(refusing))
            return
        assert refusing is None, f"charge accepted over the limit of {refusing.cgroup.path}"
        assert charge.css is css
        self.charges.append(charge)
        # Within every level's limit at the time of charging, and within the capacity.
        for level in css_chain(css):
            assert level.usage[t] <= min(level.max[t], CAPACITY[t])

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def tree_matches_the_model(self):
        live = live_cgroups(self.h)
        assert {cg.path for cg in live} == self.paths
        assert set(self.h.by_id.values()) == set(live)
        assert {pid: cg.path for pid, cg in self.h.procs.members.items()} == self.pids
        for cg in live:
            assert cg.subtree_control == (ENCIDS if cg.path in self.enabled else 0)
            assert cg.populated == self.populated(cg)
            assert (cg.css[0] is not None) == (cg.parent is None or cg.parent.path in self.enabled)

    @invariant()
    def usage_is_the_sum_of_the_charges_below(self):
        csses = {cg.css[0] for cg in live_cgroups(self.h) if cg.css[0] is not None}
        csses.update(level for c in self.charges for level in css_chain(c.css))
        for css in csses:
            for t in range(len(CAPACITY)):
                assert css.usage[t] == self.model_usage(css, t)
                assert css.max[t] == self.max_of(css, t)
        for t, capacity in enumerate(CAPACITY):
            assert self.encids.used(t) <= capacity

    @invariant()
    def descendant_counters_match_a_walk(self):
        live = live_cgroups(self.h)
        # A removed cgroup lingers while a charge pins a css of it or of a cgroup below it.
        lingering = [cg for cg in self.removed
                     if any(is_below(c.css.cgroup, cg) for c in self.charges)]
        online = [cg.css[0] for cg in live if cg.css[0] is not None]
        offline = {level for c in self.charges for level in css_chain(c.css)} - set(online)
        assert all(css.online for css in online) and not any(css.online for css in offline)
        for cg in live + lingering:
            assert cg.nr_descendants == sum(is_below(d, cg) for d in live if d is not cg)
            assert cg.nr_dying_descendants == sum(is_below(d, cg) for d in lingering if d is not cg)
            assert cg.nr_dying_subsys[0] == sum(is_below(css.cgroup, cg) for css in offline)
        for css in online:
            below = [other for other in online if other is not css]
            assert css.nr_descendants == sum(is_below(o.cgroup, css.cgroup) for o in below)


TestEngine = EngineMachine.TestCase
TestEngine.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    database=None,  # keep no example database in the work tree
)
