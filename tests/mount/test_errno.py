"""The errnos of what cgroupfs refuses: names it will not make or change, files that do not
read or write, writes too long, and files of removed cgroups.

`cg` is a fresh cgroup of a shared instance whose root enables encids."""

from __future__ import annotations

import os
import stat

import pytest
from mountutil import outcome, read, sh, write_result

# -- names: only mkdir and rmdir change them --------------------------------------------------

def test_rename_of_a_cgroup_is_eperm(cg):
    (cg / "a").mkdir()
    (cg / "b").mkdir()
    assert outcome(lambda: os.rename(cg / "a", cg / "c")) == "EPERM"
    assert outcome(lambda: os.rename(cg / "a", cg / "b/a")) == "EPERM"
    assert sorted(p.name for p in cg.iterdir() if p.is_dir()) == ["a", "b"]


def test_rename_of_a_file_is_eperm(cg):
    assert outcome(lambda: os.rename(cg / "cgroup.procs", cg / "procs")) == "EPERM"
    assert outcome(lambda: os.rename(cg / "cgroup.type", cg / "cgroup.freeze")) == "EPERM"


def test_mv_in_a_shell_fails(cg):
    (cg / "a").mkdir()
    result = sh(f"mv {cg}/a {cg}/b", check=False)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    assert (cg / "a").is_dir() and not (cg / "b").exists()


def test_unlink_of_a_file_is_eperm(cg):
    assert outcome(lambda: os.unlink(cg / "cgroup.procs")) == "EPERM"
    assert sh(f"rm -f {cg}/cgroup.max.depth", check=False).returncode != 0
    assert (cg / "cgroup.max.depth").exists()


def test_creating_a_file_is_eacces(cg):
    flags = os.O_WRONLY | os.O_CREAT
    assert outcome(lambda: os.open(cg / "new", flags, 0o644)) == "EACCES"
    assert outcome(lambda: os.open(cg / "new", flags | os.O_EXCL, 0o644)) == "EACCES"
    result = sh(f"touch {cg}/new", check=False)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert not os.path.lexists(cg / "new")


def test_o_creat_on_an_existing_file_just_opens_it(cg):
    fd = os.open(cg / "cgroup.max.depth", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)


@pytest.mark.parametrize("kind", [stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR],
                         ids=["regular", "fifo", "chardev"])
def test_mknod_is_eacces(cg, kind):
    assert outcome(lambda: os.mknod(cg / "node", kind | 0o644, os.makedev(1, 3))) == "EACCES"


def test_link_is_eperm(cg):
    assert outcome(lambda: os.link(cg / "cgroup.procs", cg / "procs")) == "EPERM"


def test_symlink_is_eperm(cg):
    assert outcome(lambda: os.symlink("cgroup.procs", cg / "procs")) == "EPERM"
    assert sh(f"ln -s x {cg}/l", check=False).returncode != 0


# -- mkdir and rmdir ----------------------------------------------------------------------------

def test_mkdir_of_an_existing_cgroup_is_eexist(cg):
    (cg / "a").mkdir()
    assert outcome(lambda: os.mkdir(cg / "a")) == "EEXIST"
    assert "File exists" in sh(f"mkdir {cg}/a", check=False).stderr


@pytest.mark.parametrize("name", ["cgroup.procs", "cgroup.stat", "encids.sev.stat"])
def test_mkdir_over_a_root_file_is_eexist(shared_mnt, name):
    assert outcome(lambda: os.mkdir(shared_mnt / name)) == "EEXIST"


@pytest.mark.parametrize("name", ["cgroup.kill", "cgroup.events", "encids.sev.max"])
def test_mkdir_over_a_child_file_is_eexist(cg, name):
    assert outcome(lambda: os.mkdir(cg / name)) == "EEXIST"


def test_mkdir_of_a_name_with_a_newline_is_einval(cg):
    assert outcome(lambda: os.mkdir(cg / "a\nb")) == "EINVAL"


def test_rmdir_of_a_file_is_enotdir(cg):
    assert outcome(lambda: os.rmdir(cg / "cgroup.procs")) == "ENOTDIR"
    assert outcome(lambda: os.rmdir(cg / "cgroup.kill")) == "ENOTDIR"


def test_rmdir_of_a_cgroup_with_children_is_ebusy(cg):
    (cg / "a/b").mkdir(parents=True)
    assert outcome(lambda: os.rmdir(cg / "a")) == "EBUSY"
    assert "Device or resource busy" in sh(f"rmdir {cg}/a", check=False).stderr
    os.rmdir(cg / "a/b")
    os.rmdir(cg / "a")


def test_rmdir_of_a_missing_cgroup_is_enoent(cg):
    assert outcome(lambda: os.rmdir(cg / "a")) == "ENOENT"


# -- files that do not read or write ------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "cgroup.controllers", "cgroup.stat", "cgroup.events", "encids.sev.current",
    "encids.sev.events", "encids.sev_es.current",
])
def test_root_may_open_a_read_only_child_file_for_writing_but_the_write_is_einval(cg, name):
    before = read(cg / name)
    fd = os.open(cg / name, os.O_WRONLY)
    try:
        assert outcome(lambda: os.write(fd, b"1")) == "EINVAL"
    finally:
        os.close(fd)
    assert read(cg / name) == before


@pytest.mark.parametrize("name", ["cgroup.controllers", "cgroup.stat", "encids.sev.stat"])
def test_writing_a_read_only_root_file_is_einval(shared_mnt, name):
    assert write_result(shared_mnt / name, "1") == "EINVAL"


def test_reading_cgroup_kill_is_einval(cg):
    fd = os.open(cg / "cgroup.kill", os.O_RDONLY)  # root overrides the 0200 mode
    try:
        assert outcome(lambda: os.read(fd, 100)) == "EINVAL"
    finally:
        os.close(fd)
    assert "Invalid argument" in sh(f"cat {cg}/cgroup.kill", check=False).stderr


# -- writes too long ----------------------------------------------------------------------------

def test_a_write_longer_than_4096_bytes_is_e2big(cg):
    assert write_result(cg / "cgroup.max.depth", b" " * 4096 + b"7") == "E2BIG"
    assert write_result(cg / "cgroup.max.depth", b"7" + b" " * 100_000) == "E2BIG"
    assert read(cg / "cgroup.max.depth") == "max\n"


@pytest.mark.parametrize("padding", [4091, 4095])
def test_a_write_of_up_to_4096_bytes_is_parsed(cg, padding):
    assert write_result(cg / "cgroup.max.depth", b" " * padding + b"7") == "OK"
    assert read(cg / "cgroup.max.depth") == "7\n"


# -- files of removed cgroups -------------------------------------------------------------------

def test_reading_an_open_file_of_a_removed_cgroup_is_enodev(cg):
    fd = os.open(cg / "cgroup.events", os.O_RDONLY)
    try:
        os.rmdir(cg)
        assert outcome(lambda: os.pread(fd, 100, 0)) == "ENODEV"
    finally:
        os.close(fd)


def test_writing_an_open_file_of_a_removed_cgroup_is_enodev(cg):
    fd = os.open(cg / "cgroup.max.depth", os.O_WRONLY)
    try:
        os.rmdir(cg)
        assert outcome(lambda: os.write(fd, b"3")) == "ENODEV"
    finally:
        os.close(fd)


def test_a_new_cgroup_of_the_same_name_does_not_revive_old_descriptors(cg):
    fd = os.open(cg / "cgroup.max.depth", os.O_RDWR)
    try:
        os.rmdir(cg)
        cg.mkdir()
        assert outcome(lambda: os.write(fd, b"3")) == "ENODEV"
        assert read(cg / "cgroup.max.depth") == "max\n"
    finally:
        os.close(fd)
