"""The allocator: hands out ID numbers and knows who holds them, as KVM's sev.c owns the ASID
bitmap.  It is not a controller: for each allocation it charges every resource controller the
hierarchy has (sev_asid_new() calls misc_cg_try_charge()), all or nothing.  The first that
refuses counts the refusal, and nothing is charged anywhere.

An allocation is for a guest, a kind of VM as KVM tells them apart: each type's own (sev,
sev_es, ...), and SEV-SNP, whose IDs are charged to sev_es.  A guest takes its IDs from its own
range: with ciphertext hiding (kvm_amd's ciphertext_hiding_asids), SNP guests the lowest IDs of
sev_es's and SEV-ES guests the rest; without it, the two share sev_es's IDs.
"""

from __future__ import annotations

import errno

from .cgroup import Cgroup, Hierarchy
from .css import Css
from .errors import RangeFull, fail
from .events import Commit, no_journal
from .ids import IdSpace
from .resource import Charge, ResourceController, ResourceCss, Types

SNP, SNP_TYPE = "snp", "sev_es"  # KVM charges an SNP guest's ASID as an SEV-ES guest's


class Guest:
    """A kind of VM: the type its IDs are charged to, and the IDs it takes them from."""

    __slots__ = ("name", "type", "space")

    def __init__(self, name: str, type_index: int, space: IdSpace) -> None:
        self.name = name
        self.type = type_index
        self.space = space


class Allocation:
    """The IDs one allocate() handed out that are still held: one charge per controller."""

    __slots__ = ("holder", "guest", "origin", "charges")

    def __init__(self, holder: int, guest: Guest, origin: Cgroup,
                 charges: list[Charge]) -> None:
        self.holder = holder
        self.guest = guest
        self.origin = origin  # the cgroup the holder was in when charged
        self.charges = charges

    @property
    def type(self) -> int:
        return self.guest.type


class Allocator:
    def __init__(self, hierarchy: Hierarchy, types: Types, snp_asids: int | None = 0) -> None:
        """`snp_asids`: how many of sev_es's IDs SNP guests have to themselves (ciphertext
        hiding); 0: they share them with SEV-ES guests; None: the host runs no SNP guests."""
        self.hierarchy = hierarchy
        self.types = types
        self.controllers = [c for c in hierarchy.controllers if isinstance(c, ResourceController)]
        self.guests = _guests(types, snp_asids)
        self.spaces = list({id(g.space): g.space for g in self.guests.values()}.values())
        self._allocated: dict[int, Allocation] = {}  # ID -> its allocation
        self._held: dict[int, set[int]] = {}  # holder PID -> its IDs

    def guest(self, type_name: str, guest_name: str | None = None) -> Guest:
        """The guest an allocation of `type_name` is for (by default the type's own), as KVM
        checks it: EINVAL for a type it cannot charge or a guest not of that type or not run
        here (KVM_CREATE_VM), ENOTTY for a guest whose range is empty (sev_asid_new())."""
        t = self.types.usable(type_name)
        name = type_name if guest_name is None else guest_name
        guest = self.guests.get(name)
        if guest is None:
            raise fail(errno.EINVAL, f"this host runs no {name} guests")
        if guest.type != t:
            raise fail(errno.EINVAL, f"{name} guests do not take {type_name} IDs")
        if not guest.space.ids:
            raise fail(errno.ENOTTY, f"{name} guests have no IDs on this host (ciphertext "
                                     f"hiding gave them all to SNP guests)")
        return guest

    def allocate(self, holder: int, type_name: str, count: int, commit: Commit = no_journal,
                 origin: Cgroup | None = None, guest_name: str | None = None) -> list[int]:
        """Charge `count` IDs to `origin`, by default the cgroup the holder is in now, in every
        controller, and hand out the lowest free ones of the guest's range (the type's own
        guest by default)."""
        if count < 1:
            raise fail(errno.EINVAL, "count must be at least 1")
        guest = self.guest(type_name, guest_name)
        t = guest.type
        if origin is None:
            origin = self.hierarchy.membership.cgroup_of(holder)
        csses = [controller.effective_css(origin) for controller in self.controllers]
        for controller, css in zip(self.controllers, csses):
            refusing = controller.refusing_level(css, t, count)
            if refusing is not None:
                controller.refuse(css, refusing, t, count)
        if guest.space.available() < count:
            # sev_asid_new() charged, found its range full and uncharged: the watermarks stay.
            for controller, css in zip(self.controllers, csses):
                controller.raise_peak(css, t, count)
            raise RangeFull(guest.name, guest.space.ids)
        commit()
        charges = [controller.charge(css, t, count)
                   for controller, css in zip(self.controllers, csses)]
        ids = guest.space.take(count)
        self._hold(Allocation(holder, guest, origin, charges), ids)
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
            allocation.guest.space.give_back(id_)

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
        """Take back IDs a holder had before a restart (of a release without guests), charged
        to cg's effective csses as they were, whatever the limits are now (a limit may have
        been lowered since)."""
        guest = self._restored_guest(type_name, None)
        charges = [controller.charge(controller.effective_css(cg), guest.type, len(ids))
                   for controller in self.controllers]
        for id_ in ids:
            guest.space.claim(id_)
        self._hold(Allocation(holder, guest, cg, charges), ids)

    def dump(self, css_index: dict[Css, int]) -> list[list]:
        """Each allocation once: [type, holder, origin cgroup id, its IDs, {controller: css},
        guest]."""
        entries: dict[int, list] = {}
        for id_, allocation in sorted(self._allocated.items()):
            entry = entries.setdefault(id(allocation), [
                self.types.names[allocation.type], allocation.holder, allocation.origin.id, [],
                {c.name: css_index[charge.css]
                 for c, charge in zip(self.controllers, allocation.charges)},
                allocation.guest.name])
            entry[3].append(id_)
        return list(entries.values())

    def load(self, entries: list[list], cgroups: dict[int, Cgroup],
             csses: dict[int, Css]) -> None:
        """What dump() wrote.  A controller the snapshot's daemon did not have is charged at the
        effective css of the allocation's cgroup (its books start with what is held now); the
        pins are counted by the snapshot's recount.  An entry without a guest (an older
        release's) is for its type's own."""
        for type_name, holder, origin_id, ids, charged, *rest in entries:
            guest = self._restored_guest(type_name, rest[0] if rest else None)
            t = guest.type
            origin = cgroups[origin_id]
            charges = []
            for controller in self.controllers:
                if controller.name in charged:
                    css = csses[charged[controller.name]]
                    assert isinstance(css, ResourceCss), "dump() names the controller's own css"
                    charge = Charge(css, t, len(ids))
                    for level in charge.css.ancestors():
                        level.usage[t] += len(ids)
                else:
                    charge = controller.charge(controller.effective_css(origin), t, len(ids))
                charges.append(charge)
            for id_ in ids:
                guest.space.claim(id_)
            self._hold(Allocation(holder, guest, origin, charges), ids)

    def _restored_guest(self, type_name: str, guest_name: str | None) -> Guest:
        """The guest of IDs held before a restart.  One this host no longer runs (SNP turned
        off since: its range is no part of the layout unless split, so it was shared) gives
        way to its type's own, whose range holds them."""
        self.types.index(type_name)  # EINVAL for a type the host does not have
        return self.guests.get(guest_name or type_name) or self.guests[type_name]

    def kvm_log(self) -> list[dict]:
        """The ranges of the guests of SEV's types as sev_hardware_setup() logs them, in its
        order: a guest with IDs is "enabled", one whose range is empty "unusable", and one the
        host does not run (SEV-ES without IDs, SNP turned off) "disabled", with KVM's
        ASIDs: SEV-ES's then unset, SNP's those it would share."""
        lines = []
        names = self.types.names
        if "sev" in names:
            lines.append(self._kvm_line("sev", self.guests["sev"].space.ids))
        if SNP_TYPE not in names:
            return lines
        es = self.guests[SNP_TYPE]
        if self.types.capacity[es.type] == 0:
            return lines + [{"guest": name, "state": "disabled", "first": 0, "last": 0}
                            for name in (SNP_TYPE, SNP)]
        lines.append(self._kvm_line(SNP_TYPE, es.space.ids))
        snp = self.guests.get(SNP)
        if snp is None:
            ids = self.types.ranges[es.type]
            lines.append({"guest": SNP, "state": "disabled", "first": ids.start,
                          "last": ids.stop - 1})
        else:
            lines.append(self._kvm_line(SNP, snp.space.ids))
        return lines

    @staticmethod
    def _kvm_line(name: str, ids: range) -> dict:
        return {"guest": name, "state": "enabled" if ids else "unusable", "first": ids.start,
                "last": ids.stop - 1}

    def origins(self) -> set[Cgroup]:
        """The cgroups the allocations were charged in."""
        return {allocation.origin for allocation in self._allocated.values()}

    def pins(self) -> list[Css]:
        """The csses the charges pin, one entry a pin."""
        allocations = {id(a): a for a in self._allocated.values()}.values()
        return [charge.css for allocation in allocations for charge in allocation.charges]


def _guests(types: Types, snp_asids: int | None) -> dict[str, Guest]:
    """Each type's own guest with the type's IDs, and the SNP guest beside SEV-ES's."""
    guests = {name: Guest(name, t, IdSpace(ids))
              for t, (name, ids) in enumerate(zip(types.names, types.ranges))}
    es = guests.get(SNP_TYPE)
    if es is None or snp_asids is None or SNP in guests:  # a type named snp keeps the name
        return guests
    # sev_hardware_setup(): ciphertext hiding gives SNP guests the first snp_asids IDs
    # (capped at all of them) and SEV-ES guests the rest.
    split = min(snp_asids, len(es.space.ids))
    if split:
        guests[SNP] = Guest(SNP, es.type, IdSpace(es.space.ids[:split]))
        es.space = IdSpace(es.space.ids[split:])
    else:
        guests[SNP] = Guest(SNP, es.type, es.space)
    return guests
