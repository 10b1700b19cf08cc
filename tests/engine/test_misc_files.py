"""misc's file table (encidfs/files/misc.py) for each kernel that changed it, on both sides of
each change (no mount: tests/mount/test_kernel_interface.py reads them through one)."""

import errno

import pytest

from encidfs.engine import EncidsController, MiscController, new_engine
from encidfs.engine.kernel import KernelInterface
from encidfs.files.cftype import Placement
from encidfs.files.misc import misc_files

MISC = 2  # its bit in subtree_control, after encids
ROOT, CHILD, EVERYWHERE = Placement.ONLY_ON_ROOT, Placement.NOT_ON_ROOT, Placement.EVERYWHERE
FIRST = {"misc.capacity": ROOT, "misc.current": CHILD, "misc.max": CHILD}  # 5.13
EVENTS = FIRST | {"misc.events": CHILD}  # 5.16
ROOT_CURRENT = EVENTS | {"misc.current": EVERYWHERE}  # 6.5
PEAK = ROOT_CURRENT | {"misc.peak": EVERYWHERE, "misc.events.local": CHILD}  # 6.11


def table(version, capacities=None):
    engine = new_engine(capacities or {"sev": 4}, controllers=(EncidsController, MiscController),
                        kernel=KernelInterface(version))
    controller = engine.hierarchy.controller("misc")
    return engine, {row.name: row for row in misc_files(controller)}


@pytest.mark.parametrize("version, files", [
    ((5, 13), FIRST), ((5, 15), FIRST), ((5, 16), EVENTS), ((6, 1), EVENTS), ((6, 4), EVENTS),
    ((6, 5), ROOT_CURRENT), ((6, 10), ROOT_CURRENT), ((6, 11), PEAK), ((6, 16), PEAK),
    ((7, 0), PEAK),
])
def test_each_kernel_has_its_files_where_it_had_them(version, files):
    _, rows = table(version)
    assert {name: row.placement for name, row in rows.items()} == files
    assert [name for name, row in rows.items() if row.write] == ["misc.max"]


def test_the_newest_is_the_default():
    assert KernelInterface() == KernelInterface((6, 18))


@pytest.mark.parametrize("version, types", [((6, 15), ["sev"]), ((6, 16), ["sev", "tdx"])])
def test_tdx_is_listed_from_6_16(version, types):
    engine, rows = table(version, {"sev": 4, "tdx": 2})
    h = engine.hierarchy
    h.write_subtree_control(h.root, MISC, 0)
    a = h.mkdir(h.root, "a")
    for name, cg in (("misc.capacity", h.root), ("misc.current", a), ("misc.max", a)):
        assert [line.split()[0] for line in rows[name].show(cg).splitlines()] == types


def test_a_kernel_before_tdx_takes_no_tdx_limit():
    engine, rows = table((6, 1), {"sev": 4, "tdx": 2})
    h = engine.hierarchy
    h.write_subtree_control(h.root, MISC, 0)
    a = h.mkdir(h.root, "a")
    with pytest.raises(OSError) as refused:
        rows["misc.max"].write(a, b"tdx 1", None, None)  # refused before anything is written
    assert refused.value.errno == errno.EINVAL
