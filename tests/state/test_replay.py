"""Allocations replayed from the journal without a mount: a record names its guest, so that
the replay takes the IDs from the same range; an older record without one is for its type's
own guest."""

import pytest
from fakes import changes_for

from encidfs.engine import MiscController, RangeFull, new_engine
from encidfs.files.misc import misc_files
from encidfs.state.operations import Op

SEV_ES = 1
HOLDER, START = 7, 100


def changes_with(snp_asids, journal=None):
    engine = new_engine({"sev": 4, "sev_es": 6}, {"sev": 7, "sev_es": 1},
                        (MiscController,), snp_asids=snp_asids)
    return changes_for(engine, journal, tables=[misc_files])


def test_a_replay_takes_each_guests_ids_from_its_range():
    live = changes_with(snp_asids=2)
    root = live.hierarchy.root.id
    records = [("allocate", HOLDER, START, "sev_es", 2, root, "snp"),
               ("allocate", HOLDER, START, "sev_es", 1, root, "sev_es"),
               ("allocate", HOLDER, START, "sev_es", 1, root, "snp")]  # SNP's range is full
    outcomes = live.run_all(records)
    assert [outcome.unwrap() for outcome in outcomes[:2]] == [[1, 2], [3]]
    with pytest.raises(RangeFull):
        outcomes[2].unwrap()
    replayed = changes_with(snp_asids=2)
    assert replayed.replay(records) == 0  # the refusal is refused again, not a failure
    for changes in (live, replayed):
        allocator = changes.allocator
        assert allocator.holdings() == {HOLDER: {1, 2, 3}}
        assert [allocator.allocation_of(i).guest.name for i in (1, 2, 3)] == [
            "snp", "snp", "sev_es"]
        root_css = changes.hierarchy.root.css[0]
        assert (root_css.usage[SEV_ES], root_css.peak[SEV_ES]) == (3, 4)  # the refusal's peak


def test_an_older_record_without_a_guest_is_for_the_types_own():
    changes = changes_with(snp_asids=2)
    root = changes.hierarchy.root.id
    assert changes.replay([("allocate", HOLDER, START, "sev_es", 1, root),
                           ("allocate", HOLDER, START, "sev", 1)]) == 0
    assert changes.allocator.allocation_of(3).guest.name == "sev_es"
    assert changes.allocator.allocation_of(7).guest.name == "sev"


def test_a_controller_setting_replays_from_its_set_max_record():
    """Op.CONTROLLER_SETTING journals a controller's setting under the name its records have
    always had, "set_max": a journal an earlier release wrote replays."""
    changes = changes_with(snp_asids=0)
    h = changes.hierarchy
    misc = h.controller("misc")
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(h.root, 1 << misc.ssid, 0)
    assert changes.replay([("set_max", a.id, "misc", "sev_es", 1)]) == 0
    assert misc.css_of(a).max[SEV_ES] == 1


def test_a_controller_setting_is_journalled_as_set_max():
    journal = Journal()
    changes = changes_with(snp_asids=0, journal=journal)
    h = changes.hierarchy
    misc = h.controller("misc")
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(h.root, 1 << misc.ssid, 0)
    changes.run(Op.CONTROLLER_SETTING, a.id, "misc", "sev_es", 2)
    assert journal.records == [("set_max", a.id, "misc", "sev_es", 2)]
    assert misc.css_of(a).max[SEV_ES] == 2


class Journal:
    def __init__(self):
        self.records = []

    def append(self, record):
        self.records.append(record)

    def append_all(self, records):
        self.records.extend(records)

    def stage(self, record):
        self.records.append(record)
