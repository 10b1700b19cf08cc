"""The kernfs node table and its cftype rows against an engine, no FUSE: which files each
cgroup shows, their modes and owners, what writes answer (errno), and the xattr budgets."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from errnos import raises_errno
from fakes import Requests, changes_for

from encidfs.engine import EncidsController, MiscController, new_engine
from encidfs.engine.budget import Budget
from encidfs.files.cftype import Caller
from encidfs.files.encids import encids_files
from encidfs.files.kernfs import ROOT_INODE
from encidfs.files.openfile import WRITE_MAX
from encidfs.files.xattrs import XATTR_BYTES_MAX, XATTRS_MAX

ROOT = Caller(pid=1, uid=0, gid=0)
ALICE = Caller(pid=2, uid=1000, gid=1000)
BOB = Caller(pid=3, uid=1001, gid=1001)
OWNERS = frozenset({0})


def new_table(share: float = 0.25) -> Requests:
    engine = new_engine({"sev": 4, "sev_es": 2}, controllers=(EncidsController, MiscController))
    return Requests(changes_for(engine, owners=OWNERS, share=share))


@pytest.fixture
def fs() -> Requests:
    return new_table()


def names(fs: Requests, inode: int) -> set[str]:
    return {name.decode() for name, _ in fs.entries(inode)} - {".", ".."}


def write(fs: Requests, inode: int, path: str, text: bytes, caller: Caller = ROOT) -> int:
    node = fs.lookup(inode, path.encode())
    return fs.open(node, caller, os.O_WRONLY).write(text)


def read(fs: Requests, inode: int, path: str, caller: Caller = ROOT) -> str:
    return fs.open(fs.lookup(inode, path.encode()), caller).read(0, 4096).decode()


def mkdir(fs: Requests, name: str, caller: Caller = ROOT, parent: int = ROOT_INODE,
          mode: int = 0o755) -> int:
    return fs.mkdir(parent, name.encode(), stat.S_IFDIR | mode, caller).inode


# -- which files, where ---------------------------------------------------------------------


def test_the_root_has_the_stat_files_and_a_child_the_limits(fs):
    root = names(fs, ROOT_INODE)
    assert {"cgroup.procs", "cgroup.subtree_control", "encids.sev.stat", "misc.capacity"} <= root
    assert not root & {"cgroup.type", "cgroup.kill", "cgroup.events", "cgroup.freeze"}
    child = mkdir(fs, "a")
    assert {"cgroup.type", "cgroup.kill", "cgroup.events"} <= names(fs, child)
    assert not any(name.startswith(("encids.", "misc.")) for name in names(fs, child))
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    assert {"encids.sev.max", "encids.sev_es.current"} <= names(fs, child)
    assert "encids.sev.stat" not in names(fs, child)
    assert "misc.max" not in names(fs, child)


@pytest.mark.parametrize("name, mode", [
    ("cgroup.procs", 0o644), ("cgroup.events", 0o444), ("cgroup.kill", 0o200),
    ("encids.sev.max", 0o644), ("encids.sev.current", 0o444),
])
def test_modes_are_the_kernels(fs, name, mode):
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(fs, "a")
    attr = fs.attr(fs.lookup(child, name.encode()))
    assert attr.mode == stat.S_IFREG | mode


def test_a_new_cgroup_and_its_files_are_their_creators(fs):
    child = mkdir(fs, "a", ALICE, mode=0o750)
    attr = fs.attr(fs.node(child))
    assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFDIR | 0o750, 1000, 1000)
    procs = fs.attr(fs.lookup(child, b"cgroup.procs"))
    assert (procs.uid, procs.gid) == (1000, 1000)
    root = fs.attr(fs.node(ROOT_INODE))
    assert stat.S_IMODE(root.mode) == (0o555 if os.geteuid() == 0 else 0o755)


def test_controller_files_are_the_subtree_control_writers(fs):
    child = mkdir(fs, "a")
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids", Caller(4, 0, 1234))
    attr = fs.attr(fs.lookup(child, b"encids.sev.max"))
    assert (attr.uid, attr.gid) == (0, 1234)
    assert fs.attr(fs.lookup(child, b"cgroup.procs")).gid == 0  # made with the cgroup


def test_lookups_of_what_is_not_there(fs):
    with raises_errno(errno.ENOENT):
        fs.lookup(ROOT_INODE, b"nothing")
    with raises_errno(errno.ENOENT):
        fs.lookup(ROOT_INODE, b"cgroup.kill")  # a file, but not on the root
    procs = fs.lookup(ROOT_INODE, b"cgroup.procs")
    with raises_errno(errno.ENOTDIR):
        fs.mkdir(procs.inode, b"a", stat.S_IFDIR | 0o755, ROOT)
    with raises_errno(errno.EISDIR):
        fs.open(fs.node(ROOT_INODE), ROOT)
    with raises_errno(errno.EEXIST):
        mkdir(fs, "cgroup.procs")


def test_a_removed_cgroups_open_files_are_enodev_and_its_nodes_gone(fs):
    child = mkdir(fs, "a")
    events = fs.open(fs.lookup(child, b"cgroup.events"), ROOT)
    fs.rmdir(ROOT_INODE, b"a")
    with raises_errno(errno.ENODEV):
        events.read(0, 4096)
    with raises_errno(errno.ENOENT):
        fs.node(child)


def test_a_disabled_controllers_open_file_is_enodev_even_once_enabled_again(fs):
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(fs, "a")
    limit = fs.open(fs.lookup(child, b"encids.sev.max"), ROOT, os.O_WRONLY)
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"-encids")
    with raises_errno(errno.ENOENT):
        fs.lookup(child, b"encids.sev.max")
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    with raises_errno(errno.ENODEV):
        limit.write(b"1")


# -- writes and what they answer ------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    (b"3", "3\n"), (b" 3\n", "3\n"), (b"max", "max\n"), (b"0x2", "2\n"), (b"010", "8\n"),
    (b"2\0junk", "2\n"),  # kernfs hands the handler the text up to the first NUL
])
def test_encids_max_takes_what_kstrtoull_takes(fs, text, shown):
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(fs, "a")
    assert write(fs, child, "encids.sev.max", text) == len(text)
    assert read(fs, child, "encids.sev.max") == shown


@pytest.mark.parametrize("path, text, code", [
    ("encids.sev.max", b"-1", errno.EINVAL),
    ("encids.sev.max", b"", errno.EINVAL),
    ("encids.sev.max", b"18446744073709551616", errno.ERANGE),
    ("encids.sev.max", b"1" * (WRITE_MAX + 1), errno.E2BIG),
    ("encids.sev.current", b"1", errno.EINVAL),  # no write handler
    ("misc.max", b"sev", errno.EINVAL),
    ("misc.max", b"nope 1", errno.EINVAL),
    ("misc.max", b"sev  1", errno.EINVAL),  # one space splits: the value is " 1"
    ("cgroup.type", b"domain", errno.EINVAL),
    ("cgroup.freeze", b"2", errno.ERANGE),
    ("cgroup.kill", b"0", errno.ERANGE),
    ("cgroup.max.depth", b"-1", errno.ERANGE),
    ("cgroup.max.descendants", b"lots", errno.EINVAL),
    ("cgroup.max.descendants", b"2147483648", errno.ERANGE),
    ("cgroup.procs", b"-3", errno.EINVAL),
    ("cgroup.subtree_control", b"encids", errno.EINVAL),
    ("cgroup.subtree_control", b"+cpu", errno.EINVAL),
])
def test_refused_writes_answer_the_kernels_errno_and_change_nothing(fs, path, text, code):
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+encids +misc")
    child = mkdir(fs, "a")
    before = {name: read(fs, child, name) for name in names(fs, child)
              if fs.lookup(child, name.encode()).cftype.show}
    with raises_errno(code):
        write(fs, child, path, text)
    assert {name: read(fs, child, name) for name in before} == before


def test_misc_max_is_a_line_per_type(fs):
    write(fs, ROOT_INODE, "cgroup.subtree_control", b"+misc")
    child = mkdir(fs, "a")
    write(fs, child, "misc.max", b"sev_es 1\n")
    assert read(fs, child, "misc.max") == "sev max\nsev_es 1\n"


def test_core_files_show_what_their_writes_set(fs):
    child = mkdir(fs, "a")
    write(fs, child, "cgroup.max.descendants", b"4")
    write(fs, child, "cgroup.freeze", b"1")
    assert read(fs, child, "cgroup.max.descendants") == "4\n"
    assert read(fs, child, "cgroup.freeze") == "1\n"
    assert read(fs, child, "cgroup.events") == "populated 0\nfrozen 1\n"
    assert read(fs, ROOT_INODE, "cgroup.stat").startswith("nr_descendants 1\n")
    write(fs, child, "cgroup.type", b"threaded")
    assert read(fs, child, "cgroup.type") == "threaded\n"


def test_a_read_of_a_write_only_file_is_einval(fs):
    child = mkdir(fs, "a")
    with raises_errno(errno.EINVAL):
        read(fs, child, "cgroup.kill")


# -- moving processes across a delegation boundary ------------------------------------------


def delegated(fs: Requests) -> tuple[int, int, int]:
    """/alice (hers, her cgroup.procs too), /alice/x and /alice/y (hers), /other (root's)."""
    alice = mkdir(fs, "alice")
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        fs.setattr(fs.lookup(alice, name.encode()), uid=ALICE.uid, gid=ALICE.gid)
    x, y = mkdir(fs, "x", ALICE, alice), mkdir(fs, "y", ALICE, alice)
    mkdir(fs, "other")
    return alice, x, y


def test_a_delegatee_moves_processes_within_her_subtree(fs):
    _, x, y = delegated(fs)
    write(fs, x, "cgroup.procs", b"42")  # root put it there
    write(fs, y, "cgroup.procs", b"42", ALICE)
    assert read(fs, y, "cgroup.procs") == "42\n"
    assert fs.changes.starts == {42: 142}


def test_a_delegatee_may_not_move_one_out_of_her_subtree(fs):
    _, x, _ = delegated(fs)
    write(fs, x, "cgroup.procs", b"42")
    other = fs.lookup(ROOT_INODE, b"other").inode
    with raises_errno(errno.EACCES):  # the common ancestor is the root: not hers
        write(fs, other, "cgroup.procs", b"42", ALICE)
    assert read(fs, x, "cgroup.procs") == "42\n"


def test_writing_0_moves_the_writer(fs):
    _, x, _ = delegated(fs)
    write(fs, x, "cgroup.procs", b"0", ROOT)
    assert read(fs, x, "cgroup.procs") == f"{ROOT.pid}\n"


@pytest.mark.parametrize("mode, caller, allowed", [
    (0o644, Caller(1, 1000, 1000), True),  # the owner
    (0o444, Caller(1, 1000, 1000), False),
    (0o664, Caller(1, 1001, 1000), True),  # the group
    (0o664, Caller(1, 1001, 7, frozenset({1000})), True),  # a supplementary group
    (0o644, Caller(1, 1001, 1000), False),
    (0o646, Caller(1, 1001, 1001), True),  # others
    (0o000, Caller(1, 0, 0), True),  # CAP_DAC_OVERRIDE
])
def test_may_write_is_generic_permission(mode, caller, allowed):
    assert caller.may_write(mode, 1000, 1000) is allowed


# -- attributes and xattrs ------------------------------------------------------------------


def test_modes_and_owners_are_kept_in_the_dump(fs):
    child = mkdir(fs, "a")
    procs = fs.lookup(child, b"cgroup.procs")
    fs.setattr(procs, mode=0o600, uid=7, gid=8)
    attr = fs.attr(procs)
    assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFREG | 0o600, 7, 8)
    cgid = str(procs.cgroup.id)
    assert fs.dump()[cgid]["attrs"] == {"cgroup.procs": [stat.S_IFREG | 0o600, 7, 8]}


def test_xattrs_set_listed_and_removed(fs):
    node = fs.node(mkdir(fs, "a"))
    fs.setxattr(node, b"user.a", b"1", ALICE)
    fs.setxattr(node, b"user.a", b"22", ALICE)  # replaced
    fs.setxattr(node, b"user.b", b"\xff\x00", ALICE)  # bytes, kept exactly
    assert fs.getxattr(node, b"user.a") == b"22"
    assert sorted(fs.listxattr(node)) == [b"user.a", b"user.b"]
    assert fs.getxattr(node, b"user.b") == b"\xff\x00"
    fs.removexattr(node, b"user.a")
    with raises_errno(errno.ENODATA):
        fs.getxattr(node, b"user.a")
    with raises_errno(errno.ENODATA):
        fs.removexattr(node, b"user.a")
    assert fs.xattrs.byte_budget.held == {ALICE.uid: len(b"user.b\xff\x00")}


def test_a_node_holds_kernfs_count_and_size_of_xattrs(fs):
    node = fs.node(mkdir(fs, "a"))
    for i in range(XATTRS_MAX):
        fs.setxattr(node, f"user.{i}".encode(), b"", ROOT)
    with raises_errno(errno.ENOSPC):
        fs.setxattr(node, b"user.one-more", b"", ROOT)
    fs.setxattr(node, b"user.0", b"x", ROOT)  # replacing takes no new name
    other = fs.node(mkdir(fs, "b"))
    fs.setxattr(other, b"user.big", b"x" * (XATTR_BYTES_MAX - 1), ROOT)
    with raises_errno(errno.ENOSPC):
        fs.setxattr(other, b"user.more", b"xx", ROOT)


def test_root_xattrs_of_the_daemon_are_read_only():
    engine = new_engine({"sev": 4}, controllers=(EncidsController,))
    fs = Requests(changes_for(engine, tables=[encids_files],
                                 root_xattrs={"user.encidfs.pid": "1"}))
    root = fs.node(ROOT_INODE)
    assert fs.getxattr(root, b"user.encidfs.pid") == b"1"
    with raises_errno(errno.EPERM):
        fs.setxattr(root, b"user.encidfs.pid", b"2", ROOT)
    with raises_errno(errno.EPERM):
        fs.removexattr(root, b"user.encidfs.pid")


@pytest.fixture
def small(fs) -> Requests:
    """xattr budgets of 100 bytes and 10 names: a user's share is a quarter."""
    fs.xattrs.byte_budget = Budget("bytes", 100, errno.ENOSPC, OWNERS, 0.25)
    fs.xattrs.name_budget = Budget("names", 10, errno.ENOSPC, OWNERS, 0.25)
    return fs


def test_a_user_holds_her_share_of_xattr_bytes(small):
    node = small.node(mkdir(small, "a"))
    small.setxattr(node, b"user.a", b"x" * 19, ALICE)  # 25 bytes with its name: her share
    with raises_errno(errno.ENOSPC):
        small.setxattr(node, b"user.b", b"", ALICE)
    small.setxattr(node, b"user.b", b"", BOB)  # another user's share is his
    with raises_errno(errno.ENOSPC):  # a replacement is charged as much as it is
        small.setxattr(node, b"user.a", b"x" * 20, ALICE)
    assert small.getxattr(node, b"user.a") == b"x" * 19  # the refusal kept the old value
    small.setxattr(node, b"user.a", b"x" * 10, ALICE)
    assert small.xattrs.byte_budget.held[ALICE.uid] == 16


def test_users_leave_the_owner_a_reserve(small):
    node = small.node(mkdir(small, "a"))
    # Users together may hold 9 of the 10 names, 2 each: four users and one name of a fifth.
    for i in range(9):
        small.setxattr(node, f"user.{i}".encode(), b"", Caller(1, 2000 + i // 2, 2000))
    with raises_errno(errno.ENOSPC):
        small.setxattr(node, b"user.9", b"", Caller(1, 2004, 2000))
    small.setxattr(node, b"user.owner", b"", ROOT)
    assert small.xattrs.name_budget.in_all == small.xattrs.name_budget.total
