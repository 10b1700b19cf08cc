"""The cgroup tree: mkdir and rmdir, cgroup.stat's counts, cgroup.max.depth and
cgroup.max.descendants, and the structural rules of cgroup.subtree_control.

`cg` is a fresh cgroup of a shared instance whose root enables encids; `mnt` a fresh
instance, for what is about the root itself."""

from __future__ import annotations

import os

from mountutil import keyed, outcome, read, sh, wait_until, write, write_result


def stat_of(cgroup):
    return keyed(read(cgroup / "cgroup.stat"))


# -- mkdir and rmdir ------------------------------------------------------------------------

def test_mkdir_and_rmdir_through_a_shell(cg):
    sh(f"mkdir {cg}/a && mkdir -p {cg}/a/b/c")
    assert "c" in sh(f"ls {cg}/a/b").stdout.split()
    sh(f"rmdir {cg}/a/b/c {cg}/a/b {cg}/a")
    assert not (cg / "a").exists()


def test_rmdir_of_an_empty_cgroup_frees_its_name_at_once(cg):
    (cg / "a").mkdir()
    write(cg / "a/cgroup.max.depth", "3")
    os.rmdir(cg / "a")
    assert outcome(lambda: os.stat(cg / "a")) == "ENOENT"
    (cg / "a").mkdir()
    assert read(cg / "a/cgroup.max.depth") == "max\n"  # a new cgroup, not the old one


def test_nr_descendants_counts_live_descendants(cg):
    for name in ("a", "a/b", "a/b/c", "d"):
        (cg / name).mkdir()
    assert stat_of(cg)["nr_descendants"] == 4
    assert stat_of(cg / "a")["nr_descendants"] == 2
    assert stat_of(cg / "d")["nr_descendants"] == 0
    os.rmdir(cg / "a/b/c")
    assert stat_of(cg)["nr_descendants"] == 3
    assert stat_of(cg / "a")["nr_descendants"] == 1


def test_removed_descendants_stop_dying(cg):
    (cg / "a/b").mkdir(parents=True)
    os.rmdir(cg / "a/b")
    os.rmdir(cg / "a")
    wait_until(lambda: stat_of(cg)["nr_dying_descendants"] == 0, "no dying descendants")
    wait_until(lambda: stat_of(cg)["nr_dying_subsys_encids"] == 0, "no dying encids csses")
    assert stat_of(cg)["nr_descendants"] == 0


def test_nr_subsys_encids_counts_own_and_descendant_csses(cg):
    (cg / "a").mkdir()
    (cg / "b").mkdir()
    (cg / "a/x").mkdir()
    # Nothing below cg has a css yet: cg's parent enables encids for cg only.
    assert stat_of(cg)["nr_subsys_encids"] == 1
    assert stat_of(cg / "a")["nr_subsys_encids"] == 0
    write(cg / "cgroup.subtree_control", "+encids")  # a and b get one
    assert stat_of(cg)["nr_subsys_encids"] == 3
    assert stat_of(cg / "a")["nr_subsys_encids"] == 1
    assert stat_of(cg / "a/x")["nr_subsys_encids"] == 0
    write(cg / "a/cgroup.subtree_control", "+encids")  # and a/x
    assert stat_of(cg)["nr_subsys_encids"] == 4
    assert stat_of(cg / "a")["nr_subsys_encids"] == 2
    assert stat_of(cg / "a/x")["nr_subsys_encids"] == 1
    os.rmdir(cg / "b")
    assert stat_of(cg)["nr_subsys_encids"] == 3
    write(cg / "a/cgroup.subtree_control", "-encids")
    assert stat_of(cg)["nr_subsys_encids"] == 2
    wait_until(lambda: stat_of(cg)["nr_dying_subsys_encids"] == 0, "no dying encids csses")


def test_root_nr_subsys_encids_is_one_plus_children_it_enables_encids_for(mnt):
    (mnt / "a").mkdir()
    assert stat_of(mnt)["nr_subsys_encids"] == 1
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "b").mkdir()
    assert stat_of(mnt) == {"nr_descendants": 2, "nr_subsys_encids": 3, "nr_subsys_misc": 1,
                            "nr_dying_descendants": 0, "nr_dying_subsys_encids": 0,
                            "nr_dying_subsys_misc": 0}


# -- cgroup.max.depth and cgroup.max.descendants --------------------------------------------

def test_max_depth_limits_how_deep_below_a_cgroup_one_may_go(cg):
    write(cg / "cgroup.max.depth", "2")
    (cg / "a").mkdir()
    (cg / "a/b").mkdir()
    assert outcome(lambda: os.mkdir(cg / "a/b/c")) == "EAGAIN"
    result = sh(f"mkdir {cg}/a/b/c", check=False)
    assert "Resource temporarily unavailable" in result.stderr
    write(cg / "cgroup.max.depth", "max")
    (cg / "a/b/c").mkdir()


def test_max_depth_zero_allows_no_children(cg):
    write(cg / "cgroup.max.depth", "0")
    assert outcome(lambda: os.mkdir(cg / "a")) == "EAGAIN"


def test_max_depth_of_any_ancestor_applies(cg):
    (cg / "a").mkdir()
    write(cg / "cgroup.max.depth", "1")
    assert read(cg / "a/cgroup.max.depth") == "max\n"
    assert outcome(lambda: os.mkdir(cg / "a/b")) == "EAGAIN"


def test_max_descendants_limits_live_descendants(cg):
    write(cg / "cgroup.max.descendants", "2")
    (cg / "a").mkdir()
    (cg / "a/b").mkdir()
    assert outcome(lambda: os.mkdir(cg / "c")) == "EAGAIN"
    assert outcome(lambda: os.mkdir(cg / "a/c")) == "EAGAIN"
    os.rmdir(cg / "a/b")  # a removed cgroup no longer counts, even while dying
    (cg / "c").mkdir()


def test_max_descendants_of_any_ancestor_applies(cg):
    (cg / "a").mkdir()
    write(cg / "a/cgroup.max.descendants", "0")
    assert outcome(lambda: os.mkdir(cg / "a/b")) == "EAGAIN"
    (cg / "b").mkdir()  # the limit is a's, not cg's


def test_lowering_a_limit_below_the_present_count_is_accepted(cg):
    (cg / "a/b").mkdir(parents=True)
    assert write_result(cg / "cgroup.max.descendants", "0") == "OK"
    assert write_result(cg / "cgroup.max.depth", "0") == "OK"
    assert (cg / "a/b").is_dir()
    assert outcome(lambda: os.mkdir(cg / "c")) == "EAGAIN"


def test_an_existing_name_is_eexist_even_at_the_limit(cg):
    (cg / "a").mkdir()
    write(cg / "cgroup.max.descendants", "1")
    assert outcome(lambda: os.mkdir(cg / "a")) == "EEXIST"
    assert outcome(lambda: os.mkdir(cg / "cgroup.procs")) == "EEXIST"


# -- cgroup.subtree_control: what may be enabled and disabled where --------------------------

def test_enabling_what_the_parent_does_not_offer_is_enoent(cg):
    (cg / "a").mkdir()
    assert read(cg / "a/cgroup.controllers") == ""
    assert write_result(cg / "a/cgroup.subtree_control", "+encids") == "ENOENT"
    assert "No such file or directory" in sh(
        f"echo +encids > {cg}/a/cgroup.subtree_control", check=False).stderr
    assert write_result(cg / "a/cgroup.subtree_control", "-encids") == "OK"


def test_disabling_while_a_child_still_enables_it_is_ebusy(cg):
    (cg / "a/b").mkdir(parents=True)
    write(cg / "cgroup.subtree_control", "+encids")
    write(cg / "a/cgroup.subtree_control", "+encids")
    assert write_result(cg / "cgroup.subtree_control", "-encids") == "EBUSY"
    assert read(cg / "cgroup.subtree_control") == "encids\n"
    write(cg / "a/cgroup.subtree_control", "-encids")
    assert write_result(cg / "cgroup.subtree_control", "-encids") == "OK"
    assert read(cg / "a/cgroup.controllers") == ""


def test_the_root_may_disable_once_no_child_enables(mnt):
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    write(mnt / "a/cgroup.subtree_control", "+encids")
    assert write_result(mnt / "cgroup.subtree_control", "-encids") == "EBUSY"
    write(mnt / "a/cgroup.subtree_control", "-encids")
    assert write_result(mnt / "cgroup.subtree_control", "-encids") == "OK"
    assert read(mnt / "a/cgroup.controllers") == ""


def test_a_removed_child_no_longer_blocks_disabling(cg):
    (cg / "a").mkdir()
    write(cg / "cgroup.subtree_control", "+encids")
    write(cg / "a/cgroup.subtree_control", "+encids")
    os.rmdir(cg / "a")
    assert write_result(cg / "cgroup.subtree_control", "-encids") == "OK"


def test_writes_to_a_removed_cgroup_are_enodev(cg):
    (cg / "a").mkdir()
    fd = os.open(cg / "a/cgroup.subtree_control", os.O_WRONLY)
    try:
        os.rmdir(cg / "a")
        assert outcome(lambda: os.write(fd, b"+encids")) == "ENODEV"
    finally:
        os.close(fd)


def test_enabling_is_eexist_where_a_child_has_a_cgroup_named_like_a_new_file(cg):
    """The kernel cannot create encids.sev.max in a where a has a child cgroup of that name:
    the write fails with EEXIST and nothing is enabled."""
    (cg / "a/encids.sev.max").mkdir(parents=True)
    assert write_result(cg / "cgroup.subtree_control", "+encids") == "EEXIST"
    assert read(cg / "cgroup.subtree_control") == ""
    assert (cg / "a/encids.sev.max").is_dir()
    os.rmdir(cg / "a/encids.sev.max")
    assert write_result(cg / "cgroup.subtree_control", "+encids") == "OK"
    assert os.path.isfile(cg / "a/encids.sev.max")
