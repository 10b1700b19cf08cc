"""The Encryption IDs controller: per-type limits and hierarchical charges.

The rules are those of the kernel's misc controller, which upstream merged in place of the
"encids" proposal: a charge walks from the charged css to the root and every level must stay
within both its own max and the type's capacity; a refusal undoes nothing because nothing was
applied yet, counts one event at the refusing level and each of its ancestors, and is EBUSY.
A charge stays with the css it was made against until it is freed, whatever happens to the
process or the cgroup afterwards.
"""

from __future__ import annotations

import errno

from .cgroup import Cgroup, Change, css_put
from .css import Controller, Css
from .errors import ChargeRefused, fail

U64_MAX = 2**64 - 1  # encids.<type>.max "max"


class EncidsCss(Css):
    __slots__ = ("max", "usage", "events")

    def __init__(self, ssid: int, cgroup: Cgroup, parent: Css | None, nr_types: int) -> None:
        super().__init__(ssid, cgroup, parent)
        self.max = [U64_MAX] * nr_types
        self.usage = [0] * nr_types
        self.events = [0] * nr_types


class Charge:
    """IDs of one type charged to one css; it pins the css until uncharged."""

    __slots__ = ("css", "type", "amount")

    def __init__(self, css: EncidsCss, type_index: int, amount: int) -> None:
        self.css = css
        self.type = type_index
        self.amount = amount

    @property
    def cgroup(self) -> Cgroup:
        return self.css.cgroup


class EncidsController(Controller):
    name = "encids"

    def __init__(self, capacities: dict[str, int]) -> None:
        self.types = list(capacities)
        self.capacity = list(capacities.values())
        self._index = {name: i for i, name in enumerate(self.types)}

    def css_alloc(self, cgroup: Cgroup, parent: Css | None) -> EncidsCss:
        return EncidsCss(self.ssid, cgroup, parent, len(self.types))

    def type_index(self, name: str) -> int:
        index = self._index.get(name)
        if index is None:
            raise fail(errno.EINVAL, f"unknown encryption ID type {name!r}")
        return index

    def css_of(self, cg: Cgroup) -> EncidsCss:
        """The css whose limit files cg shows; only present while the parent enables encids."""
        css = cg.css[self.ssid]
        if css is None:
            raise fail(errno.ENOENT, f"encids is not enabled for {cg.path}")
        return css  # type: ignore[return-value]

    def used(self, type_index: int) -> int:
        return self.hierarchy.root.css[self.ssid].usage[type_index]  # type: ignore[union-attr]

    def set_max(self, cg: Cgroup, type_index: int, value: int) -> None:
        """A limit below the usage or above the capacity is accepted; later charges obey it."""
        self.css_of(cg).max[type_index] = value

    def try_charge(self, cg: Cgroup, type_name: str, amount: int) -> Charge:
        t = self.type_index(type_name)
        if self.capacity[t] == 0:
            raise fail(errno.EINVAL, f"{type_name} has no IDs on this host")
        css: EncidsCss = self.hierarchy.effective_css(cg, self)  # type: ignore[assignment]
        capacity = self.capacity[t]
        level: EncidsCss | None = css
        while level is not None:
            new_usage = level.usage[t] + amount
            if new_usage > level.max[t] or new_usage > capacity:
                self._count_refusal(level, t)
                raise ChargeRefused(type_name, level.cgroup.path)
            level = level.parent  # type: ignore[assignment]
        level = css
        while level is not None:
            level.usage[t] += amount
            level = level.parent  # type: ignore[assignment]
        css.refs += 1  # the charge pins its css until uncharged
        return Charge(css, t, amount)

    def uncharge(self, charge: Charge) -> None:
        level: EncidsCss | None = charge.css
        while level is not None:
            level.usage[charge.type] -= charge.amount
            level = level.parent  # type: ignore[assignment]
        css_put(charge.css)

    def _count_refusal(self, refusing: EncidsCss, t: int) -> None:
        level: EncidsCss | None = refusing
        while level is not None:
            level.events[t] += 1
            self.hierarchy.changes.append((Change.CONTROLLER_EVENTS, level.cgroup))
            level = level.parent  # type: ignore[assignment]
