"""The allocator: hands out ID numbers and knows who holds them, as KVM's sev.c owns the ASID
bitmap.  It is not a controller: for each allocation it charges every resource controller the
hierarchy has (sev_asid_new() calls misc_cg_try_charge()), all or nothing.  The first that
refuses counts the refusal, and nothing is charged anywhere.
"""

from __future__ import annotations

import errno

from .cgroup import Cgroup, Commit, Hierarchy, no_journal
from .css import Css
from .errors import fail
from .ids import IdSpace
from .resource import Charge, ResourceController, Types


class Allocation:
    """The IDs one allocate() handed out that are still held: one charge per controller."""

    __slots__ = ("holder", "type", "origin", "charges")

    def __init__(self, holder: int, type_index: int, origin: Cgroup,
                 charges: list[Charge]) -> None:
        self.holder = holder
        self.type = type_index
        self.origin = origin  # the cgroup the holder was in when charged
        self.charges = charges


class Allocator:
    def __init__(self, hierarchy: Hierarchy, types: Types) -> None:
        self.hierarchy = hierarchy
        self.types = types
        self.controllers = [c for c in hierarchy.controllers if isinstance(c, ResourceController)]
        self.spaces = [IdSpace(ids) for ids in types.ranges]
        self._allocated: dict[int, Allocation] = {}  # ID -> its allocation
        self._held: dict[int, set[int]] = {}  # holder PID -> its IDs

    def allocate(self, holder: int, type_name: str, count: int, commit: Commit = no_journal,
                 origin: Cgroup | None = None) -> list[int]:
        """Charge `count` IDs to `origin`, by default the cgroup the holder is in now, in every
        controller, and hand out the lowest free ones."""
        if count < 1:
            raise fail(errno.EINVAL, "count must be at least 1")
        t = self.types.usable(type_name)
        if origin is None:
            origin = self.hierarchy.membership.cgroup_of(holder)
        csses = [controller.effective_css(origin) for controller in self.controllers]
        for controller, css in zip(self.controllers, csses):
            refusing = controller.refusing_level(css, t, count)
            if refusing is not None:
                controller.refuse(css, refusing, t, count)
        commit()
        charges = [controller.charge(css, t, count)
                   for controller, css in zip(self.controllers, csses)]
        ids = self.spaces[t].take(count)
        self._hold(Allocation(holder, t, origin, charges), ids)
        return ids

    def free(self, ids: list[int], commit: Commit = no_journal) -> None:
        """Free IDs; all of them must be allocated (EINVAL otherwise, and nothing is freed)."""
        unknown = [id_ for id_ in ids if id_ not in self._allocated]
        if unknown or len(set(ids)) != len(ids):
            raise fail(errno.EINVAL, f"not allocated: {unknown or ids}")
        commit()
        for id_ in ids:
            allocation = self._allocated.pop(id_)
            held = self._held[allocation.holder]
            held.discard(id_)
            if not held:
                del self._held[allocation.holder]
            for controller, charge in zip(self.controllers, allocation.charges):
                controller.uncharge(charge, 1)
            self.spaces[allocation.type].give_back(id_)

    def release_holder(self, holder: int) -> list[int]:
        """The holder is gone (like a VM's fd closing): free everything it held."""
        ids = sorted(self._held.get(holder, ()))
        if ids:
            self.free(ids)
        return ids

    def holder_of(self, id_: int) -> int | None:
        allocation = self._allocated.get(id_)
        return allocation.holder if allocation else None

    def holdings(self) -> dict[int, set[int]]:
        """Holder PID -> the IDs it holds."""
        return self._held

    def allocation_of(self, id_: int) -> Allocation | None:
        return self._allocated.get(id_)

    def _hold(self, allocation: Allocation, ids: list[int]) -> None:
        held = self._held.setdefault(allocation.holder, set())
        for id_ in ids:
            self._allocated[id_] = allocation
            held.add(id_)

    # -- restoring --------------------------------------------------------------------------------

    def adopt(self, holder: int, type_name: str, ids: list[int], cg: Cgroup) -> None:
        """Take back IDs a holder had before a restart, charged to cg's effective csses as they
        were, whatever the limits are now (a limit may have been lowered since)."""
        t = self.types.index(type_name)
        charges = [controller.charge(controller.effective_css(cg), t, len(ids))
                   for controller in self.controllers]
        for id_ in ids:
            self.spaces[t].claim(id_)
        self._hold(Allocation(holder, t, cg, charges), ids)

    def dump(self, css_index: dict[Css, int]) -> list[list]:
        """Each allocation once: [type, holder, origin cgroup id, its IDs, {controller: css}]."""
        entries: dict[int, list] = {}
        for id_, allocation in sorted(self._allocated.items()):
            entry = entries.setdefault(id(allocation), [
                self.types.names[allocation.type], allocation.holder, allocation.origin.id, [],
                {c.name: css_index[charge.css]
                 for c, charge in zip(self.controllers, allocation.charges)}])
            entry[3].append(id_)
        return list(entries.values())

    def load(self, entries: list[list], cgroups: dict[int, Cgroup],
             csses: dict[int, Css]) -> None:
        """What dump() wrote.  A controller the snapshot's daemon did not have is charged at the
        effective css of the allocation's cgroup (its books start with what is held now); the
        pins are counted by the snapshot's recount."""
        for type_name, holder, origin_id, ids, charged in entries:
            t = self.types.index(type_name)
            origin = cgroups[origin_id]
            charges = []
            for controller in self.controllers:
                if controller.name in charged:
                    charge = Charge(csses[charged[controller.name]], t, len(ids))  # type: ignore[arg-type]
                    for level in charge.css.ancestors():
                        level.usage[t] += len(ids)  # type: ignore[attr-defined]
                else:
                    charge = controller.charge(controller.effective_css(origin), t, len(ids))
                charges.append(charge)
            for id_ in ids:
                self.spaces[t].claim(id_)
            self._hold(Allocation(holder, t, origin, charges), ids)

    def origins(self) -> set[Cgroup]:
        """The cgroups the allocations were charged in."""
        return {allocation.origin for allocation in self._allocated.values()}

    def pins(self) -> list[Css]:
        """The csses the charges pin, one entry a pin."""
        allocations = {id(a): a for a in self._allocated.values()}.values()
        return [charge.css for allocation in allocations for charge in allocation.charges]
