"""Guests: which IDs an allocation takes, as KVM's sev_asid_new() picks them.  An SNP guest is
charged to sev_es; with ciphertext hiding it takes its ASIDs from 1..N and SEV-ES guests from
N+1..min_sev_asid-1, without it the two share 1..min_sev_asid-1.  A full range is EBUSY with no
event, the charge given back (its watermarks stay, as misc_cg_try_charge() raised them)."""

import errno

import pytest
from errnos import raises_errno

from encidfs.engine import (
    ChargeRefused,
    EncidsController,
    MiscController,
    RangeFull,
    new_engine,
    snapshot,
)

ENCIDS, MISC = 1, 2  # subtree_control masks
SEV, SEV_ES = 0, 1  # type indexes
# KVM's layout for ASIDs 1..20 with min_sev_asid 11: SEV 11..20, SEV-ES (and SNP) 1..10.
CAPACITIES, FIRST_IDS = {"sev": 10, "sev_es": 10}, {"sev": 11, "sev_es": 1}
HOLDER = 7


def engine_with(snp_asids):
    engine = new_engine(CAPACITIES, FIRST_IDS, (EncidsController, MiscController),
                        snp_asids=snp_asids)
    h = engine.hierarchy
    h.write_subtree_control(h.root, ENCIDS | MISC, 0)
    h.procs.attach(HOLDER, h.mkdir(h.root, "vm"))
    return engine


def books(engine, cg):
    """Per controller, sev_es's (usage, peak, events, events_local) at cg."""
    return {name: (css.usage[SEV_ES], css.peak[SEV_ES], css.events[SEV_ES],
                   css.events_local[SEV_ES])
            for name in ("encids", "misc")
            for css in [engine.hierarchy.controller(name).css_of(cg)]}


def test_with_ciphertext_hiding_snp_takes_1_to_n_and_sev_es_the_rest():
    engine = engine_with(snp_asids=4)
    allocate = engine.allocator.allocate
    assert allocate(HOLDER, "sev_es", 2, guest_name="snp") == [1, 2]
    assert allocate(HOLDER, "sev_es", 1) == [5]  # the type's own guest by default
    assert allocate(HOLDER, "sev_es", 1, guest_name="sev_es") == [6]
    assert allocate(HOLDER, "sev_es", 2, guest_name="snp") == [3, 4]
    assert allocate(HOLDER, "sev", 1) == [11]
    vm = engine.hierarchy.root.children["vm"]
    assert books(engine, vm)["misc"][0] == books(engine, vm)["encids"][0] == 6  # all sev_es


def test_the_n_plus_first_snp_guest_is_ebusy_without_an_event():
    engine = engine_with(snp_asids=3)
    allocator, vm = engine.allocator, engine.hierarchy.root.children["vm"]
    allocator.allocate(HOLDER, "sev_es", 3, guest_name="snp")
    before = books(engine, vm)
    with pytest.raises(RangeFull) as full:
        allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    assert full.value.errno == errno.EBUSY and not isinstance(full.value, ChargeRefused)
    # Charged and given back: no usage, no event, but the watermark the charge raised.
    assert books(engine, vm) == {name: (3, 4, 0, 0) for name in before}
    assert engine.hierarchy.controller("misc").css_of(engine.hierarchy.root).peak[SEV_ES] == 4
    # SEV-ES guests still have 4..10, which the same misc capacity (10) lets them take.
    assert allocator.allocate(HOLDER, "sev_es", 7) == list(range(4, 11))
    with pytest.raises(ChargeRefused) as refused:  # now the capacity refuses, with an event
        allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    assert (refused.value.controller, refused.value.path) == ("encids", "/vm")  # the first
    assert books(engine, vm)["encids"][2] == 1


def test_a_limit_refuses_before_the_range_is_looked_at():
    """misc_cg_try_charge() comes first: over a limit it is the controller's EBUSY and event,
    even when the range is full too."""
    engine = engine_with(snp_asids=1)
    allocator, vm = engine.allocator, engine.hierarchy.root.children["vm"]
    allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    engine.hierarchy.controller("misc").set_max(vm, SEV_ES, 1)
    with pytest.raises(ChargeRefused) as refused:
        allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    assert (refused.value.controller, refused.value.path) == ("misc", "/vm")
    assert books(engine, vm)["misc"] == (1, 1, 1, 1)


def test_a_full_sev_es_range_is_ebusy_without_an_event_too():
    """SNP's IDs count against sev_es's capacity but leave SEV-ES's range: it can be full with
    the charge passing."""
    engine = engine_with(snp_asids=8)
    allocator = engine.allocator
    assert allocator.allocate(HOLDER, "sev_es", 2) == [9, 10]
    with pytest.raises(RangeFull):
        allocator.allocate(HOLDER, "sev_es", 1)
    assert allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp") == [1]


def test_without_ciphertext_hiding_snp_and_sev_es_share_the_range():
    engine = engine_with(snp_asids=0)
    allocator = engine.allocator
    assert allocator.allocate(HOLDER, "sev_es", 2, guest_name="snp") == [1, 2]
    assert allocator.allocate(HOLDER, "sev_es", 1) == [3]
    allocator.free([1])
    assert allocator.allocate(HOLDER, "sev_es", 1) == [1]  # freed by an SNP guest, reused
    assert allocator.allocate(HOLDER, "sev_es", 7, guest_name="snp") == list(range(4, 11))
    with pytest.raises(ChargeRefused):  # full: the capacity says so first, as misc does
        allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")


def test_ciphertext_hiding_for_every_id_leaves_sev_es_guests_enotty():
    """A cap past the range gives SNP all of it (KVM caps ciphertext_hiding_asids so); SEV-ES
    guests then have an empty range: ENOTTY before any charge."""
    engine = engine_with(snp_asids=2**32 - 1)
    allocator, vm = engine.allocator, engine.hierarchy.root.children["vm"]
    with raises_errno(errno.ENOTTY):
        allocator.allocate(HOLDER, "sev_es", 1)
    assert books(engine, vm)["misc"] == (0, 0, 0, 0)
    assert allocator.allocate(HOLDER, "sev_es", 10, guest_name="snp") == list(range(1, 11))


@pytest.mark.parametrize("type_name, guest, snp_asids", [
    ("sev", "snp", 0),  # an SNP guest's IDs are sev_es's
    ("sev", "sev_es", 0),
    ("sev_es", "sev", 0),
    ("sev_es", "snp", None),  # SNP turned off (kvm_amd's sev_snp is N)
    ("sev_es", "tdx", 0),
])
def test_a_guest_that_does_not_fit_is_einval_and_changes_nothing(type_name, guest, snp_asids):
    engine = engine_with(snp_asids)
    vm = engine.hierarchy.root.children["vm"]
    with raises_errno(errno.EINVAL):
        engine.allocator.allocate(HOLDER, type_name, 1, guest_name=guest)
    assert books(engine, vm)["misc"] == (0, 0, 0, 0)


def test_the_guest_survives_a_snapshot_and_frees_into_its_own_range():
    engine = engine_with(snp_asids=2)
    engine.allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    engine.allocator.allocate(HOLDER, "sev_es", 1)
    data = snapshot.dump(engine.hierarchy, engine.allocator)
    copy = new_engine(CAPACITIES, FIRST_IDS, (EncidsController, MiscController), snp_asids=2)
    snapshot.load(copy.hierarchy, copy.allocator, data)
    assert copy.allocator.allocation_of(1).guest.name == "snp"
    assert copy.allocator.allocation_of(3).guest.name == "sev_es"
    assert copy.allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp") == [2]
    copy.allocator.free([1, 3])
    assert copy.allocator.allocate(HOLDER, "sev_es", 1) == [3]
    assert copy.allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp") == [1]


def test_an_older_snapshot_entry_is_for_its_types_own_guest():
    engine = engine_with(snp_asids=0)
    engine.allocator.allocate(HOLDER, "sev_es", 1, guest_name="snp")
    data = snapshot.dump(engine.hierarchy, engine.allocator)
    for entry in data["allocations"]:
        del entry[5:]  # as a release without guests wrote it
    copy = new_engine(CAPACITIES, FIRST_IDS, (EncidsController, MiscController))
    snapshot.load(copy.hierarchy, copy.allocator, data)
    assert copy.allocator.allocation_of(1).guest.name == "sev_es"


@pytest.mark.parametrize("snp_asids, expected", [
    (16, [("sev", "enabled", 100, 509), ("sev_es", "enabled", 17, 99),
          ("snp", "enabled", 1, 16)]),
    (0, [("sev", "enabled", 100, 509), ("sev_es", "enabled", 1, 99),
         ("snp", "enabled", 1, 99)]),
    (99, [("sev", "enabled", 100, 509), ("sev_es", "unusable", 100, 99),
          ("snp", "enabled", 1, 99)]),
    (None, [("sev", "enabled", 100, 509), ("sev_es", "enabled", 1, 99),
            ("snp", "disabled", 1, 99)]),
])
def test_the_ranges_as_kvm_logs_them(snp_asids, expected):
    engine = new_engine({"sev": 410, "sev_es": 99}, {"sev": 100, "sev_es": 1},
                        snp_asids=snp_asids)
    assert [(line["guest"], line["state"], line["first"], line["last"])
            for line in engine.allocator.kvm_log()] == expected


def test_without_sev_es_ids_kvm_logs_sev_es_and_snp_disabled():
    engine = new_engine({"sev": 509, "sev_es": 0}, {"sev": 1, "sev_es": 1})
    assert [(line["guest"], line["state"], line["first"], line["last"])
            for line in engine.allocator.kvm_log()] == [
        ("sev", "enabled", 1, 509), ("sev_es", "disabled", 0, 0), ("snp", "disabled", 0, 0)]
