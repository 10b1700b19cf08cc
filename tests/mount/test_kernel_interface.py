"""A mount that shows a chosen kernel's misc (--kernel-interface): which misc files the root
and a child have, where a refused charge counts, and the tdx type, for each kernel that
changed them and the newest (the default).  The encids files are the same on every kernel."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from mountutil import outcome, read, write, write_result

from encidfs.client import ControlError, figures

CAPACITY = {"sev": 4}
OLDEST = ({"misc.capacity": 0o444}, {"misc.current": 0o444, "misc.max": 0o644})  # 5.13
EVENTS = (OLDEST[0], OLDEST[1] | {"misc.events": 0o444})  # 5.16
ROOT_CURRENT = (EVENTS[0] | {"misc.current": 0o444}, EVENTS[1])  # 6.5
PEAK = (ROOT_CURRENT[0] | {"misc.peak": 0o444},
        ROOT_CURRENT[1] | {"misc.peak": 0o444, "misc.events.local": 0o444})  # 6.11
# RHEL 9's 5.14, Debian 12's 6.1 and each release that changed misc (Ubuntu 22.04's 5.15 has
# 5.14's files); None is the default: the newest.
FILES = {"5.14": OLDEST, "5.16": EVENTS, "6.1": EVENTS, "6.5": ROOT_CURRENT, "6.11": PEAK,
         "6.16": PEAK, None: PEAK}
ENCIDS_CHILD = {"encids.sev.max": 0o644, "encids.sev.current": 0o444,
                "encids.sev.events": 0o444}


def modes(directory: Path, prefix: str) -> dict[str, int]:
    return {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in os.scandir(directory)
            if entry.name.startswith(prefix)}


def with_child(mount) -> Path:
    """/a, which the root enables both controllers for."""
    write(mount.path / "cgroup.subtree_control", "+encids +misc")
    (mount.path / "a").mkdir()
    return mount.path / "a"


@pytest.mark.parametrize("kernel", FILES)
def test_the_misc_files_at_the_root_and_in_a_child(encidfs_factory, kernel):
    mount = encidfs_factory(capacity=CAPACITY, kernel_interface=kernel)
    a = with_child(mount)
    root_files, child_files = FILES[kernel]
    assert modes(mount.path, "misc.") == root_files
    assert modes(a, "misc.") == child_files
    assert modes(a, "encids.") == ENCIDS_CHILD
    assert modes(mount.path, "encids.") == {"encids.sev.stat": 0o444}
    missing = {"misc.events", "misc.events.local", "misc.peak"} - set(child_files)
    assert {name: outcome(lambda name=name: os.stat(a / name)) for name in missing} == \
        dict.fromkeys(missing, "ENOENT")
    assert read(mount.path / "misc.capacity") == "sev 4\n"
    assert read(a / "misc.current") == "sev 0\n"
    write(a / "misc.max", "sev 3")
    assert read(a / "misc.max") == "sev 3\n"


@pytest.mark.parametrize("kernel", FILES)
def test_a_refused_charge_counts_where_the_kernel_had_files(encidfs_factory, kernel):
    mount = encidfs_factory(capacity=CAPACITY, kernel_interface=kernel)
    a = with_child(mount)
    write(a / "misc.max", "sev 0")
    with pytest.raises(ControlError) as refused:
        mount.run("true", cgroup="/a")
    assert (refused.value.errno, refused.value.controller, refused.value.cgroup) == \
        (errno.EBUSY, "misc", "/a")
    child_files = FILES[kernel][1]
    counted = {name: read(a / name) for name in ("misc.events", "misc.events.local")
               if name in child_files}
    # Before 5.16 the kernel logged a line and counted nothing: there is nothing to read.
    assert counted == dict.fromkeys(counted, "sev.max 1\n")
    with mount.client() as client:
        status = client.status()
    books = figures(status, next(cg for cg in status["cgroups"] if cg["path"] == "/a"),
                    "misc", "sev")
    assert (books["events"], books["events_local"]) == (
        int("misc.events" in child_files), int("misc.events.local" in child_files))
    assert read(a / "encids.sev.events") == "max 0\n"  # encids refused nothing


@pytest.mark.parametrize("kernel", ["5.14", "6.1"])
def test_a_kernel_before_6_16_has_no_tdx_in_misc(encidfs_factory, kernel):
    mount = encidfs_factory(capacity={"sev": 4, "tdx": 2}, kernel_interface=kernel)
    a = with_child(mount)
    assert read(mount.path / "misc.capacity") == "sev 4\n"
    assert read(a / "misc.current") == "sev 0\n"
    assert read(a / "misc.max") == "sev max\n"
    assert write_result(a / "misc.max", "tdx 1") == "EINVAL"  # no such type, as misc.c says
    assert read(a / "encids.tdx.max") == "max\n"  # encids is encidfs's own
    with pytest.raises(ControlError) as refused:
        mount.run("true", type="tdx", cgroup="/a")
    assert (refused.value.errno, refused.value.type) == (errno.EINVAL, "tdx")
    assert read(a / "encids.tdx.current") == "0\n"
    holder = mount.run("sleep", "600", cgroup="/a")  # sev as ever
    try:
        assert read(a / "misc.current") == "sev 1\n"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kernel", ["6.16", None])
def test_from_6_16_misc_has_tdx(encidfs_factory, kernel):
    mount = encidfs_factory(capacity={"sev": 4, "tdx": 2}, kernel_interface=kernel)
    a = with_child(mount)
    assert read(mount.path / "misc.capacity") == "sev 4\ntdx 2\n"
    write(a / "misc.max", "tdx 1")
    holder = mount.run("sleep", "600", type="tdx", cgroup="/a")
    try:
        assert read(a / "misc.current") == "sev 0\ntdx 1\n"
        with pytest.raises(ControlError) as refused:
            mount.run("true", type="tdx", cgroup="/a")
        assert (refused.value.errno, refused.value.controller) == (errno.EBUSY, "misc")
        assert read(a / "misc.events") == "sev.max 0\ntdx.max 1\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_state_file_goes_from_one_kernels_misc_to_anothers(encidfs_factory, tmp_path):
    state = tmp_path / "state.db"
    newest = encidfs_factory(capacity=CAPACITY, state=state)
    write(with_child(newest) / "misc.max", "sev 2")
    assert newest.stop() == []
    older = encidfs_factory(capacity=CAPACITY, state=state, kernel_interface="5.14")
    a = older.path / "a"
    assert modes(a, "misc.") == OLDEST[1]
    assert read(a / "misc.max") == "sev 2\n"
