"""What a cgroup v2 mount shows: which files, where, with which modes, and their formats.

`cg` is a fresh cgroup of a shared instance whose root enables encids; `mnt` is a whole fresh
instance, for what needs the root untouched."""

from __future__ import annotations

import os
import stat

import pytest
from mountutil import outcome, read, sh, write

ROOT_FILES = {
    "cgroup.controllers": 0o444,
    "cgroup.subtree_control": 0o644,
    "cgroup.procs": 0o644,
    "cgroup.threads": 0o644,
    "cgroup.max.depth": 0o644,
    "cgroup.max.descendants": 0o644,
    "cgroup.stat": 0o444,
    "encids.sev.stat": 0o444,
    "encids.sev_es.stat": 0o444,
    "misc.capacity": 0o444,
    "misc.current": 0o444,
    "misc.peak": 0o444,
}
CHILD_CORE_FILES = {
    **{name: mode for name, mode in ROOT_FILES.items()
       if not name.startswith(("encids.", "misc."))},
    "cgroup.events": 0o444,
    "cgroup.type": 0o644,
    "cgroup.freeze": 0o644,
    "cgroup.kill": 0o200,
    "cgroup.stat.local": 0o444,
}
CHILD_ENCIDS_FILES = {
    f"encids.{t}.{name}": mode
    for t in ("sev", "sev_es")
    for name, mode in (("max", 0o644), ("current", 0o444), ("events", 0o444))
}


def modes(directory):
    """{name: permission bits} of the regular files in directory; they must all be empty."""
    found = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            assert st.st_size == 0, entry.name
            found[entry.name] = stat.S_IMODE(st.st_mode)
    return found


# -- which files, with which modes ----------------------------------------------------------

def test_root_directory_is_mode_0555(shared_mnt):
    assert os.stat(shared_mnt).st_mode == stat.S_IFDIR | 0o555


def test_root_has_the_root_files_with_their_modes(mnt):
    assert modes(mnt) == ROOT_FILES
    assert sorted(os.listdir(mnt)) == sorted(ROOT_FILES)


@pytest.mark.parametrize("name", [
    "encids.sev.max", "encids.sev.current", "encids.sev.events", "cgroup.events",
    "cgroup.type", "cgroup.freeze", "cgroup.kill", "nothing",
])
def test_root_lacks_the_child_only_files_even_with_encids_enabled(shared_mnt, name):
    assert read(shared_mnt / "cgroup.subtree_control") == "encids\n"
    assert modes(shared_mnt) == ROOT_FILES
    assert outcome(lambda: os.stat(shared_mnt / name)) == "ENOENT"
    assert outcome(lambda: os.open(shared_mnt / name, os.O_RDONLY)) == "ENOENT"


def test_child_where_encids_is_enabled_has_the_limit_files(cg):
    assert modes(cg) == {**CHILD_CORE_FILES, **CHILD_ENCIDS_FILES}


def test_child_where_encids_is_not_enabled_has_only_core_files(cg):
    (cg / "b").mkdir()
    assert modes(cg / "b") == CHILD_CORE_FILES


def test_stat_files_are_only_on_the_root(cg):
    assert outcome(lambda: os.stat(cg / "encids.sev.stat")) == "ENOENT"


def test_enabling_encids_in_a_parent_gives_its_children_the_limit_files(cg):
    (cg / "b").mkdir()
    write(cg / "cgroup.subtree_control", "+encids")
    assert modes(cg / "b") == {**CHILD_CORE_FILES, **CHILD_ENCIDS_FILES}
    (cg / "c").mkdir()
    assert modes(cg / "c") == {**CHILD_CORE_FILES, **CHILD_ENCIDS_FILES}


def test_limit_files_vanish_when_the_parent_disables_encids(cg):
    (cg / "b").mkdir()
    write(cg / "cgroup.subtree_control", "+encids")
    write(cg / "cgroup.subtree_control", "-encids")
    assert modes(cg / "b") == CHILD_CORE_FILES
    for name in CHILD_ENCIDS_FILES:
        assert outcome(lambda: os.stat(cg / "b" / name)) == "ENOENT", name
        assert outcome(lambda: os.open(cg / "b" / name, os.O_RDONLY)) == "ENOENT", name


def test_limit_files_vanish_at_once_even_when_looked_up_before(cg):
    """The write that disables encids returns only once the files are gone: a stat right
    after it must not be answered from entries the kernel cached before.  (Several rounds,
    because a stale cache shows only when the write wins a race.)"""
    (cg / "b").mkdir()
    for round in range(10):
        write(cg / "cgroup.subtree_control", "+encids")
        for name in CHILD_ENCIDS_FILES:
            os.stat(cg / "b" / name)  # looked up: the kernel may now cache the entry
        write(cg / "cgroup.subtree_control", "-encids")
        still_there = [name for name in CHILD_ENCIDS_FILES
                       if outcome(lambda: os.stat(cg / "b" / name)) != "ENOENT"]
        assert still_there == [], f"round {round}"


def test_limit_files_come_back_fresh_when_reenabled(cg):
    (cg / "b").mkdir()
    write(cg / "cgroup.subtree_control", "+encids")
    write(cg / "b/encids.sev.max", "5")
    os.chmod(cg / "b/encids.sev.max", 0o600)
    write(cg / "cgroup.subtree_control", "-encids")
    write(cg / "cgroup.subtree_control", "+encids")
    assert read(cg / "b/encids.sev.max") == "max\n"
    assert stat.S_IMODE(os.stat(cg / "b/encids.sev.max").st_mode) == 0o644


def test_open_limit_file_is_enodev_once_disabled(cg):
    (cg / "b").mkdir()
    write(cg / "cgroup.subtree_control", "+encids")
    fd = os.open(cg / "b/encids.sev.max", os.O_RDWR)
    try:
        write(cg / "cgroup.subtree_control", "-encids")
        assert outcome(lambda: os.pread(fd, 100, 0)) == "ENODEV"
        assert outcome(lambda: os.write(fd, b"5")) == "ENODEV"
    finally:
        os.close(fd)


def test_ls_shows_the_kernel_modes(shared_mnt, cg):
    listing = sh(f"ls -ld {shared_mnt} && ls -l {cg}").stdout
    mode_of = {line.split()[-1]: line.split()[0] for line in listing.splitlines()
               if not line.startswith("total")}
    assert mode_of[str(shared_mnt)] == "dr-xr-xr-x"
    assert mode_of["cgroup.kill"] == "--w-------"
    assert mode_of["cgroup.events"] == "-r--r--r--"
    assert mode_of["cgroup.procs"] == "-rw-r--r--"
    assert mode_of["encids.sev.max"] == "-rw-r--r--"


def test_files_are_empty_yet_cat_prints_them(cg):
    result = sh(f"stat -c %s {cg}/cgroup.events && cat {cg}/cgroup.events")
    assert result.stdout == "0\npopulated 0\nfrozen 0\n"


def test_every_node_has_its_own_inode_number(shared_mnt, cg):
    (cg / "b").mkdir()
    paths = [shared_mnt, cg, cg / "b", *cg.iterdir(), *(cg / "b").iterdir()]
    inodes = {os.stat(p).st_ino for p in set(paths)}
    assert len(inodes) == len(set(paths))


# -- directories ----------------------------------------------------------------------------

def test_mkdir_honours_the_requested_mode(cg):
    sh(f"mkdir -m 700 {cg}/a")
    assert sh(f"ls -ld {cg}/a").stdout.startswith("drwx------ ")
    sh(f"umask 027; mkdir {cg}/b")
    assert sh(f"ls -ld {cg}/b").stdout.startswith("drwxr-x--- ")
    sh(f"umask 0; mkdir -m 1777 {cg}/c")
    assert stat.S_IMODE(os.stat(cg / "c").st_mode) == 0o1777


def test_root_nlink_is_two_plus_child_cgroups(mnt):
    assert os.stat(mnt).st_nlink == 2
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    assert os.stat(mnt).st_nlink == 4


def test_directory_nlink_is_two_plus_child_cgroups(cg):
    assert os.stat(cg).st_nlink == 2
    for name in ("a", "b", "a/c"):
        (cg / name).mkdir()
    assert os.stat(cg).st_nlink == 4
    assert os.stat(cg / "a").st_nlink == 3
    assert os.stat(cg / "a/c").st_nlink == 2
    (cg / "a/c").rmdir()
    assert os.stat(cg / "a").st_nlink == 2
    assert sh(f"stat -c %h {cg}").stdout == "4\n"


def test_chmod_of_a_file_sticks(cg):
    os.chmod(cg / "cgroup.procs", 0o664)
    assert stat.S_IMODE(os.stat(cg / "cgroup.procs").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(cg / "cgroup.threads").st_mode) == 0o644


def test_chown_of_a_cgroup_leaves_its_files_to_their_owner(cg):
    """Delegation chowns the directory and a few chosen files; the others stay root's."""
    os.chown(cg, 1000, 1000)
    assert (os.stat(cg).st_uid, os.stat(cg).st_gid) == (1000, 1000)
    for name in ("cgroup.procs", "cgroup.max.depth", "encids.sev.max"):
        st = os.stat(cg / name)
        assert (st.st_uid, st.st_gid) == (0, 0), name
    os.chown(cg / "cgroup.procs", 1000, 1000)
    assert os.stat(cg / "cgroup.procs").st_uid == 1000
    assert os.stat(cg / "cgroup.threads").st_uid == 0


# -- formats --------------------------------------------------------------------------------

def test_root_formats(mnt):
    assert read(mnt / "cgroup.controllers") == "encids misc\n"
    assert read(mnt / "cgroup.subtree_control") == ""
    assert read(mnt / "cgroup.max.depth") == "max\n"
    assert read(mnt / "cgroup.max.descendants") == "max\n"
    assert read(mnt / "cgroup.stat") == (
        "nr_descendants 0\nnr_subsys_encids 1\nnr_subsys_misc 1\nnr_dying_descendants 0\n"
        "nr_dying_subsys_encids 0\nnr_dying_subsys_misc 0\n")
    assert read(mnt / "encids.sev.stat") == "total 509\nused 0\n"
    assert read(mnt / "encids.sev_es.stat") == "total 99\nused 0\n"
    assert read(mnt / "misc.capacity") == "sev 509\nsev_es 99\n"
    assert read(mnt / "misc.current") == read(mnt / "misc.peak") == "sev 0\nsev_es 0\n"


def test_child_formats(cg):
    assert read(cg / "cgroup.controllers") == "encids\n"
    assert read(cg / "cgroup.subtree_control") == ""
    assert read(cg / "cgroup.events") == "populated 0\nfrozen 0\n"
    assert read(cg / "cgroup.type") == "domain\n"
    assert read(cg / "cgroup.freeze") == "0\n"
    assert read(cg / "cgroup.max.depth") == "max\n"
    assert read(cg / "cgroup.max.descendants") == "max\n"
    assert read(cg / "cgroup.procs") == ""
    assert read(cg / "cgroup.threads") == ""
    assert read(cg / "cgroup.stat") == (
        "nr_descendants 0\nnr_subsys_encids 1\nnr_subsys_misc 0\nnr_dying_descendants 0\n"
        "nr_dying_subsys_encids 0\nnr_dying_subsys_misc 0\n")
    for t in ("sev", "sev_es"):
        assert read(cg / f"encids.{t}.max") == "max\n"
        assert read(cg / f"encids.{t}.current") == "0\n"
        assert read(cg / f"encids.{t}.events") == "max 0\n"


def test_controllers_is_empty_where_the_parent_offers_nothing(cg):
    (cg / "b").mkdir()
    assert read(cg / "b/cgroup.controllers") == ""
    assert read(cg / "b/cgroup.stat").splitlines()[1] == "nr_subsys_encids 0"


def test_subtree_control_lists_enabled_controllers(cg):
    write(cg / "cgroup.subtree_control", "+encids")
    assert read(cg / "cgroup.subtree_control") == "encids\n"
    assert sh(f"cat {cg}/cgroup.subtree_control").stdout == "encids\n"
    write(cg / "cgroup.subtree_control", "-encids")
    assert read(cg / "cgroup.subtree_control") == ""


def test_reading_byte_by_byte_gives_the_same_text(cg):
    fd = os.open(cg / "cgroup.stat", os.O_RDONLY)
    try:
        text = b"".join(iter(lambda: os.read(fd, 1), b""))
    finally:
        os.close(fd)
    assert text.decode() == read(cg / "cgroup.stat")


def test_rereading_from_offset_zero_shows_the_current_state(cg):
    fd = os.open(cg / "cgroup.max.depth", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"max\n"
        write(cg / "cgroup.max.depth", "4")
        assert os.pread(fd, 100, 0) == b"4\n"
    finally:
        os.close(fd)


def test_root_procs_lists_root_processes_and_threads_their_threads(shared_mnt):
    listed = {int(line) for line in read(shared_mnt / "cgroup.procs").split()}
    assert {1, os.getpid()} <= listed
    threads = {int(line) for line in read(shared_mnt / "cgroup.threads").split()}
    assert {1, os.getpid()} <= threads
