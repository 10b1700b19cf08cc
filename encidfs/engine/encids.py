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

from .cgroup import Cgroup, Change, Commit, css_put, no_journal
from .css import Controller, Css
from .errors import ChargeRefused, fail
from .ids import IdSpace, consecutive_ranges

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

    def __init__(self, capacities: dict[str, int],
                 first_ids: dict[str, int] | None = None) -> None:
        """Each type's IDs are first_ids[type] onwards, or by default ranges one after another."""
        ranges = consecutive_ranges(capacities)
        if first_ids is not None:
            ranges = {name: range(first_ids[name], first_ids[name] + count)
                      for name, count in capacities.items()}
        self.types = list(capacities)
        self.capacity = list(capacities.values())
        self.spaces = [IdSpace(ranges[name]) for name in self.types]
        self._index = {name: i for i, name in enumerate(self.types)}
        self._allocated: dict[int, tuple[int, Charge]] = {}  # ID -> (holder PID, its charge)
        self._held: dict[int, set[int]] = {}  # holder PID -> its IDs

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

    def set_max(self, cg: Cgroup, type_index: int, value: int,
                commit: Commit = no_journal) -> None:
        """A limit below the usage or above the capacity is accepted; later charges obey it.
        A type with no IDs takes no limit (EINVAL), as in the misc controller."""
        css = self.css_of(cg)
        if self.capacity[type_index] == 0:
            raise fail(errno.EINVAL, f"{self.types[type_index]} has no IDs on this host")
        commit()
        css.max[type_index] = value

    def try_charge(self, cg: Cgroup, type_name: str, amount: int,
                   commit: Commit = no_journal) -> Charge:
        t = self.type_index(type_name)
        if self.capacity[t] == 0:
            raise fail(errno.EINVAL, f"{type_name} has no IDs on this host")
        css: EncidsCss = self.hierarchy.effective_css(cg, self)  # type: ignore[assignment]
        capacity = self.capacity[t]
        level: EncidsCss | None = css if amount else None  # nothing to check for nothing
        while level is not None:
            new_usage = level.usage[t] + amount
            if new_usage > level.max[t] or new_usage > capacity:
                self._count_refusal(level, t)
                raise ChargeRefused(type_name, level.cgroup.path)
            level = level.parent  # type: ignore[assignment]
        commit()
        level = css
        while level is not None:
            level.usage[t] += amount
            level = level.parent  # type: ignore[assignment]
        css.refs += 1  # the charge pins its css until uncharged
        return Charge(css, t, amount)

    def uncharge(self, charge: Charge, amount: int | None = None) -> None:
        """Give back `amount` of the charge (all of it by default); the last of it unpins."""
        amount = charge.amount if amount is None else amount
        level: EncidsCss | None = charge.css
        while level is not None:
            level.usage[charge.type] -= amount
            level = level.parent  # type: ignore[assignment]
        charge.amount -= amount
        if charge.amount == 0:
            css_put(charge.css)

    # -- ID numbers ---------------------------------------------------------------------------

    def allocate(self, holder: int, type_name: str, count: int,
                 commit: Commit = no_journal) -> list[int]:
        """Charge `count` IDs to the holder's cgroup now and hand out the lowest free ones."""
        if count < 1:
            raise fail(errno.EINVAL, "count must be at least 1")
        charge = self.try_charge(self.hierarchy.cgroup_of(holder), type_name, count, commit)
        ids = self.spaces[charge.type].take(count)
        held = self._held.setdefault(holder, set())
        for id_ in ids:
            self._allocated[id_] = (holder, charge)
            held.add(id_)
        return ids

    def adopt(self, holder: int, type_name: str, ids: list[int], cg: Cgroup) -> None:
        """Take back IDs a holder had before a restart, charged to cg as they were, whatever
        the limits are now (a limit may have been lowered below its usage since)."""
        css: EncidsCss = self.hierarchy.effective_css(cg, self)  # type: ignore[assignment]
        css.refs += 1
        self._hold(holder, Charge(css, self.type_index(type_name), len(ids)), ids)

    def _hold(self, holder: int, charge: Charge, ids: list[int]) -> None:
        """Record IDs already charged (by `charge`, which the caller pinned) as held."""
        level: EncidsCss | None = charge.css
        while level is not None:
            level.usage[charge.type] += charge.amount
            level = level.parent  # type: ignore[assignment]
        held = self._held.setdefault(holder, set())
        for id_ in ids:
            self.spaces[charge.type].claim(id_)
            self._allocated[id_] = (holder, charge)
            held.add(id_)

    # -- snapshots (see snapshot.py) ----------------------------------------------------------

    def dump_css(self, css: EncidsCss) -> dict:
        return {"max": dict(zip(self.types, css.max)), "events": dict(zip(self.types, css.events))}

    def load_css(self, css: EncidsCss, data: dict) -> None:
        for t, name in enumerate(self.types):
            css.max[t] = int(data["max"][name])
            css.events[t] = int(data["events"][name])

    def dump_charges(self, css_index: dict[Css, int]) -> list[list]:
        """Each charge once: [its css, type, holder, the IDs left of it]."""
        charges: dict[int, list] = {}
        for id_, (holder, charge) in sorted(self._allocated.items()):
            entry = charges.setdefault(id(charge), [css_index[charge.css],
                                                    self.types[charge.type], holder, []])
            entry[3].append(id_)
        return list(charges.values())

    def load_charges(self, charges: list[list], csses: list[Css]) -> None:
        """What dump_charges() wrote; the css pins are counted by the snapshot's recount."""
        for css_index, type_name, holder, ids in charges:
            charge = Charge(csses[css_index], self.type_index(type_name), len(ids))  # type: ignore[arg-type]
            self._hold(holder, charge, ids)

    def pins(self) -> list[Css]:
        """The csses that charges pin, one entry a charge."""
        return [charge.css for charge in {id(c): c for _, c in self._allocated.values()}.values()]

    def holder_of(self, id_: int) -> int | None:
        entry = self._allocated.get(id_)
        return entry[0] if entry else None

    def holdings(self) -> dict[int, set[int]]:
        """Holder PID -> the IDs it holds."""
        return self._held

    def charge_of(self, id_: int) -> Charge | None:
        entry = self._allocated.get(id_)
        return entry[1] if entry else None

    def free(self, ids: list[int], commit: Commit = no_journal) -> None:
        """Free IDs; all of them must be allocated (EINVAL otherwise, and nothing is freed)."""
        unknown = [id_ for id_ in ids if id_ not in self._allocated]
        if unknown or len(set(ids)) != len(ids):
            raise fail(errno.EINVAL, f"not allocated: {unknown or ids}")
        commit()
        for id_ in ids:
            holder, charge = self._allocated.pop(id_)
            held = self._held[holder]
            held.discard(id_)
            if not held:
                del self._held[holder]
            self.uncharge(charge, 1)
            self.spaces[charge.type].give_back(id_)

    def release_holder(self, holder: int) -> list[int]:
        """The holder is gone (like a VM's fd closing): free everything it held."""
        ids = sorted(self._held.get(holder, ()))
        if ids:
            self.free(ids)
        return ids

    def _count_refusal(self, refusing: EncidsCss, t: int) -> None:
        level: EncidsCss | None = refusing
        while level is not None:
            level.events[t] += 1
            self.hierarchy.changes.append((Change.CONTROLLER_EVENTS, level.cgroup))
            level = level.parent  # type: ignore[assignment]
