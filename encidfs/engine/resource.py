"""Controllers of a countable resource, kernel/cgroup/misc.c's way: encids and misc.

A host has resource types, each with a capacity (misc_res_capacity).  Each css of such a
controller keeps, per type, a limit, the usage of its subtree, the usage's watermark and the
refusals counted there.  A charge walks from a css to the root: every level must stay within its
limit and the capacity.  A refusal changes no usage; it counts an event (where, is each
controller's rule), and the levels it passed before the refusing one still raise their
watermark, as misc_cg_try_charge() does.  The refusal is EBUSY.  A charge stays with the css it
was made against until it is uncharged, whatever happens to the process or the cgroup since.

Charges are checked and applied in two steps (refusing_level(), then charge()) so that the
allocator can check every controller before it changes any.
"""

from __future__ import annotations

import errno

from .cgroup import Cgroup
from .css import Controller, Css, Report
from .errors import ChargeRefused, fail
from .events import Commit, no_journal
from .kernel import KernelInterface
from .refcount import css_put

U64_MAX = 2**64 - 1  # a limit of "max"


class Types:
    """The resource types of the host, in order, with their capacities and ID ranges."""

    def __init__(self, capacities: dict[str, int],
                 first_ids: dict[str, int] | None = None) -> None:
        """Each type's IDs are first_ids[type] onwards, or by default ranges one after another."""
        self.names = list(capacities)
        self.capacity = list(capacities.values())
        first = 1
        self.ranges = []
        for name, count in capacities.items():
            start = first_ids[name] if first_ids is not None else first
            self.ranges.append(range(start, start + count))
            first += count
        self._index = {name: t for t, name in enumerate(self.names)}

    def index(self, name: str) -> int:
        """A type's index; EINVAL for a type the host does not have."""
        t = self._index.get(name)
        if t is None:
            raise fail(errno.EINVAL, f"unknown resource type {name!r}")
        return t

    def usable(self, name: str) -> int:
        """A type's index; EINVAL also for one with no capacity, as misc_cg_try_charge() does."""
        t = self.index(name)
        if self.capacity[t] == 0:
            raise fail(errno.EINVAL, f"{name} has no IDs on this host")
        return t


class ResourceCss(Css):
    __slots__ = ("max", "usage", "peak", "events", "events_local")

    def __init__(self, ssid: int, cgroup: Cgroup, parent: ResourceCss | None,
                 nr_types: int) -> None:
        super().__init__(ssid, cgroup, parent)
        self.max = [U64_MAX] * nr_types
        self.usage = [0] * nr_types
        self.peak = [0] * nr_types  # the usage's watermark
        self.events = [0] * nr_types  # refusals, as the controller counts them
        self.events_local = [0] * nr_types  # refusals by this level's own limit


class Charge:
    """An amount of one type charged to one css; it pins the css until uncharged."""

    __slots__ = ("css", "type", "amount")

    def __init__(self, css: ResourceCss, type_index: int, amount: int) -> None:
        self.css = css
        self.type = type_index
        self.amount = amount

    @property
    def cgroup(self) -> Cgroup:
        return self.css.cgroup


class ResourceController(Controller[ResourceCss]):
    def __init__(self, types: Types, kernel: KernelInterface = KernelInterface()) -> None:
        self.types = types
        self.kernel = kernel  # whose interface the controller shows, if it has the kernel's
        self._unlimited = [U64_MAX] * len(types.names)  # a new css's figures
        self._zeros = [0] * len(types.names)

    def css_alloc(self, cgroup: Cgroup, parent: ResourceCss | None) -> ResourceCss:
        return ResourceCss(self.ssid, cgroup, parent, len(self.types.names))

    def css_of(self, cg: Cgroup) -> ResourceCss:
        """The css whose files cg shows; present only while the parent enables the controller."""
        css = self.cgroup_css(cg)
        if css is None:
            raise fail(errno.ENOENT, f"{self.name} is not enabled for {cg.path}")
        return css

    def effective_css(self, cg: Cgroup) -> ResourceCss:
        return self.hierarchy.effective_css(cg, self)

    def used(self, t: int) -> int:
        return self.css_of(self.hierarchy.root).usage[t]

    def set_max(self, cg: Cgroup, t: int, value: int, commit: Commit = no_journal) -> None:
        """A limit below the usage or above the capacity is accepted; later charges obey it.
        A type with no capacity takes no limit (EINVAL), as in the misc controller."""
        css = self.css_of(cg)
        if self.types.capacity[t] == 0:
            raise fail(errno.EINVAL, f"{self.types.names[t]} has no IDs on this host")
        commit()
        css.max[t] = value

    def apply_setting(self, cg: Cgroup, key: str, value: int, commit: Commit) -> None:
        """encids.<type>.max, misc.max: the limit of the type named `key`."""
        self.set_max(cg, self.types.index(key), value, commit)

    def resources(self) -> list[str]:
        return self.types.names

    def report(self, css: ResourceCss, sparse: bool) -> Report:
        if sparse and css.max == self._unlimited and css.usage == self._zeros and \
                css.peak == self._zeros and css.events == self._zeros and \
                css.events_local == self._zeros:
            return {}  # a new cgroup's, as most are: compared a list at a time
        types = self.types
        return {name: {"max": "max" if css.max[t] == U64_MAX else css.max[t],
                       "current": css.usage[t], "peak": css.peak[t], "events": css.events[t],
                       "events_local": css.events_local[t], "capacity": types.capacity[t]}
                for t, name in enumerate(types.names)
                if not sparse or css.max[t] != U64_MAX or css.usage[t] or css.peak[t]
                or css.events[t] or css.events_local[t]}

    # -- charging -------------------------------------------------------------------------------

    def refusing_level(self, css: ResourceCss, t: int, amount: int) -> ResourceCss | None:
        """The first level from css up whose limit or the capacity `amount` more would pass."""
        capacity = self.types.capacity[t]
        level: ResourceCss | None = css
        while level is not None:  # a loop, not ancestors(): this is every charge's hot path
            new_usage = level.usage[t] + amount
            if new_usage > level.max[t] or new_usage > capacity:
                return level
            level = level.parent
        return None

    def refuse(self, css: ResourceCss, refusing: ResourceCss, t: int, amount: int) -> None:
        """What a refusal leaves behind: the watermarks of the levels below the refusing one,
        and the controller's events; then the refusal itself."""
        for level in css.ancestors():
            if level is refusing:
                break
            level.peak[t] = max(level.peak[t], level.usage[t] + amount)
        self.count_refusal(refusing, t)
        raise ChargeRefused(self.name, self.types.names[t], refusing.cgroup.path)

    def count_refusal(self, refusing: ResourceCss, t: int) -> None:
        raise NotImplementedError

    def charge(self, css: ResourceCss, t: int, amount: int) -> Charge:
        """Charge what refusing_level() let through."""
        level: ResourceCss | None = css
        while level is not None:
            usage = level.usage[t] = level.usage[t] + amount
            if usage > level.peak[t]:
                level.peak[t] = usage
            level = level.parent
        css.refs += 1  # the charge pins its css until uncharged
        return Charge(css, t, amount)

    def raise_peak(self, css: ResourceCss, t: int, amount: int) -> None:
        """What a charge given back at once leaves: the watermarks of css and its ancestors."""
        level: ResourceCss | None = css
        while level is not None:
            level.peak[t] = max(level.peak[t], level.usage[t] + amount)
            level = level.parent

    def try_charge(self, cg: Cgroup, type_name: str, amount: int,
                   commit: Commit = no_journal) -> Charge:
        """misc_cg_try_charge() against cg's effective css."""
        t = self.types.usable(type_name)
        css = self.effective_css(cg)
        refusing = self.refusing_level(css, t, amount) if amount else None
        if refusing is not None:
            self.refuse(css, refusing, t, amount)
        commit()
        return self.charge(css, t, amount)

    def uncharge(self, charge: Charge, amount: int | None = None) -> None:
        """Give back `amount` of the charge (all of it by default); the last of it unpins."""
        amount = charge.amount if amount is None else amount
        t = charge.type
        level: ResourceCss | None = charge.css
        while level is not None:
            level.usage[t] -= amount
            level = level.parent
        charge.amount -= amount
        if charge.amount == 0:
            css_put(charge.css)

    def _notify(self, cg: Cgroup, key: str) -> None:
        self.hierarchy.events.append((key, cg))

    # -- snapshots ------------------------------------------------------------------------------

    def dump_css(self, css: ResourceCss) -> dict:
        names = self.types.names
        return {field: dict(zip(names, getattr(css, field)))
                for field in ("max", "peak", "events", "events_local")}

    def load_css(self, css: ResourceCss, data: dict) -> None:
        for field in ("max", "peak", "events", "events_local"):
            values = data.get(field, {})  # a field a snapshot of an older release lacks is 0
            default = U64_MAX if field == "max" else 0
            setattr(css, field, [int(values.get(name, default)) for name in self.types.names])
