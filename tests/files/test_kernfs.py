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
from encidfs.files.kernfs import ROOT_INODE, Kernfs
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
def table() -> Kernfs:
    return new_table()


def names(table: Kernfs, inode: int) -> set[str]:
    return {name.decode() for name, _ in table.entries(inode)} - {".", ".."}


def write(table: Kernfs, inode: int, path: str, text: bytes, caller: Caller = ROOT) -> int:
    node = table.lookup(inode, path.encode())
    return table.open(node, caller, os.O_WRONLY).write(text)


def read(table: Kernfs, inode: int, path: str, caller: Caller = ROOT) -> str:
    return table.open(table.lookup(inode, path.encode()), caller).read(0, 4096).decode()


def mkdir(table: Kernfs, name: str, caller: Caller = ROOT, parent: int = ROOT_INODE,
          mode: int = 0o755) -> int:
    return table.mkdir(parent, name.encode(), stat.S_IFDIR | mode, caller).inode


# -- which files, where ---------------------------------------------------------------------


def test_the_root_has_the_stat_files_and_a_child_the_limits(table):
    root = names(table, ROOT_INODE)
    assert {"cgroup.procs", "cgroup.subtree_control", "encids.sev.stat", "misc.capacity"} <= root
    assert not root & {"cgroup.type", "cgroup.kill", "cgroup.events", "cgroup.freeze"}
    child = mkdir(table, "a")
    assert {"cgroup.type", "cgroup.kill", "cgroup.events"} <= names(table, child)
    assert not any(name.startswith(("encids.", "misc.")) for name in names(table, child))
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    assert {"encids.sev.max", "encids.sev_es.current"} <= names(table, child)
    assert "encids.sev.stat" not in names(table, child)
    assert "misc.max" not in names(table, child)


@pytest.mark.parametrize("name, mode", [
    ("cgroup.procs", 0o644), ("cgroup.events", 0o444), ("cgroup.kill", 0o200),
    ("encids.sev.max", 0o644), ("encids.sev.current", 0o444),
])
def test_modes_are_the_kernels(table, name, mode):
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(table, "a")
    attr = table.attr(table.lookup(child, name.encode()))
    assert attr.mode == stat.S_IFREG | mode


def test_a_new_cgroup_and_its_files_are_their_creators(table):
    child = mkdir(table, "a", ALICE, mode=0o750)
    attr = table.attr(table.node(child))
    assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFDIR | 0o750, 1000, 1000)
    procs = table.attr(table.lookup(child, b"cgroup.procs"))
    assert (procs.uid, procs.gid) == (1000, 1000)
    root = table.attr(table.node(ROOT_INODE))
    assert stat.S_IMODE(root.mode) == (0o555 if os.geteuid() == 0 else 0o755)


def test_controller_files_are_the_subtree_control_writers(table):
    child = mkdir(table, "a")
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids", Caller(4, 0, 1234))
    attr = table.attr(table.lookup(child, b"encids.sev.max"))
    assert (attr.uid, attr.gid) == (0, 1234)
    assert table.attr(table.lookup(child, b"cgroup.procs")).gid == 0  # made with the cgroup


def test_lookups_of_what_is_not_there(table):
    with raises_errno(errno.ENOENT):
        table.lookup(ROOT_INODE, b"nothing")
    with raises_errno(errno.ENOENT):
        table.lookup(ROOT_INODE, b"cgroup.kill")  # a file, but not on the root
    procs = table.lookup(ROOT_INODE, b"cgroup.procs")
    with raises_errno(errno.ENOTDIR):
        table.mkdir(procs.inode, b"a", stat.S_IFDIR | 0o755, ROOT)
    with raises_errno(errno.EISDIR):
        table.open(table.node(ROOT_INODE), ROOT)
    with raises_errno(errno.EEXIST):
        mkdir(table, "cgroup.procs")


def test_a_removed_cgroups_open_files_are_enodev_and_its_nodes_gone(table):
    child = mkdir(table, "a")
    events = table.open(table.lookup(child, b"cgroup.events"), ROOT)
    table.rmdir(ROOT_INODE, b"a")
    with raises_errno(errno.ENODEV):
        events.read(0, 4096)
    with raises_errno(errno.ENOENT):
        table.node(child)


def test_a_disabled_controllers_open_file_is_enodev_even_once_enabled_again(table):
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(table, "a")
    limit = table.open(table.lookup(child, b"encids.sev.max"), ROOT, os.O_WRONLY)
    write(table, ROOT_INODE, "cgroup.subtree_control", b"-encids")
    with raises_errno(errno.ENOENT):
        table.lookup(child, b"encids.sev.max")
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    with raises_errno(errno.ENODEV):
        limit.write(b"1")


# -- writes and what they answer ------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    (b"3", "3\n"), (b" 3\n", "3\n"), (b"max", "max\n"), (b"0x2", "2\n"), (b"010", "8\n"),
    (b"2\0junk", "2\n"),  # kernfs hands the handler the text up to the first NUL
])
def test_encids_max_takes_what_kstrtoull_takes(table, text, shown):
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids")
    child = mkdir(table, "a")
    assert write(table, child, "encids.sev.max", text) == len(text)
    assert read(table, child, "encids.sev.max") == shown


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
def test_refused_writes_answer_the_kernels_errno_and_change_nothing(table, path, text, code):
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+encids +misc")
    child = mkdir(table, "a")
    before = {name: read(table, child, name) for name in names(table, child)
              if table.lookup(child, name.encode()).cftype.show}
    with raises_errno(code):
        write(table, child, path, text)
    assert {name: read(table, child, name) for name in before} == before


def test_misc_max_is_a_line_per_type(table):
    write(table, ROOT_INODE, "cgroup.subtree_control", b"+misc")
    child = mkdir(table, "a")
    write(table, child, "misc.max", b"sev_es 1\n")
    assert read(table, child, "misc.max") == "sev max\nsev_es 1\n"


def test_core_files_show_what_their_writes_set(table):
    child = mkdir(table, "a")
    write(table, child, "cgroup.max.descendants", b"4")
    write(table, child, "cgroup.freeze", b"1")
    assert read(table, child, "cgroup.max.descendants") == "4\n"
    assert read(table, child, "cgroup.freeze") == "1\n"
    assert read(table, child, "cgroup.events") == "populated 0\nfrozen 1\n"
    assert read(table, ROOT_INODE, "cgroup.stat").startswith("nr_descendants 1\n")
    write(table, child, "cgroup.type", b"threaded")
    assert read(table, child, "cgroup.type") == "threaded\n"


def test_a_read_of_a_write_only_file_is_einval(table):
    child = mkdir(table, "a")
    with raises_errno(errno.EINVAL):
        read(table, child, "cgroup.kill")


# -- moving processes across a delegation boundary ------------------------------------------


def delegated(table: Kernfs) -> tuple[int, int, int]:
    """/alice (hers, her cgroup.procs too), /alice/x and /alice/y (hers), /other (root's)."""
    alice = mkdir(table, "alice")
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        table.setattr(table.lookup(alice, name.encode()), uid=ALICE.uid, gid=ALICE.gid)
    x, y = mkdir(table, "x", ALICE, alice), mkdir(table, "y", ALICE, alice)
    mkdir(table, "other")
    return alice, x, y


def test_a_delegatee_moves_processes_within_her_subtree(table):
    _, x, y = delegated(table)
    write(table, x, "cgroup.procs", b"42")  # root put it there
    write(table, y, "cgroup.procs", b"42", ALICE)
    assert read(table, y, "cgroup.procs") == "42\n"
    assert table.changes.starts == {42: 142}


def test_a_delegatee_may_not_move_one_out_of_her_subtree(table):
    _, x, _ = delegated(table)
    write(table, x, "cgroup.procs", b"42")
    other = table.lookup(ROOT_INODE, b"other").inode
    with raises_errno(errno.EACCES):  # the common ancestor is the root: not hers
        write(table, other, "cgroup.procs", b"42", ALICE)
    assert read(table, x, "cgroup.procs") == "42\n"


def test_writing_0_moves_the_writer(table):
    _, x, _ = delegated(table)
    write(table, x, "cgroup.procs", b"0", ROOT)
    assert read(table, x, "cgroup.procs") == f"{ROOT.pid}\n"


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


def test_modes_and_owners_are_kept_in_the_dump(table):
    child = mkdir(table, "a")
    procs = table.lookup(child, b"cgroup.procs")
    table.setattr(procs, mode=0o600, uid=7, gid=8)
    attr = table.attr(procs)
    assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFREG | 0o600, 7, 8)
    cgid = str(procs.cgroup.id)
    assert table.dump()[cgid]["attrs"] == {"cgroup.procs": [stat.S_IFREG | 0o600, 7, 8]}


def test_xattrs_set_listed_and_removed(table):
    node = table.node(mkdir(table, "a"))
    table.setxattr(node, b"user.a", b"1", ALICE)
    table.setxattr(node, b"user.a", b"22", ALICE)  # replaced
    table.setxattr(node, b"user.b", b"\xff\x00", ALICE)  # bytes, kept exactly
    assert table.getxattr(node, b"user.a") == b"22"
    assert sorted(table.listxattr(node)) == [b"user.a", b"user.b"]
    assert table.getxattr(node, b"user.b") == b"\xff\x00"
    table.removexattr(node, b"user.a")
    with raises_errno(errno.ENODATA):
        table.getxattr(node, b"user.a")
    with raises_errno(errno.ENODATA):
        table.removexattr(node, b"user.a")
    assert table.xattrs.byte_budget.held == {ALICE.uid: len(b"user.b\xff\x00")}


def test_a_node_holds_kernfs_count_and_size_of_xattrs(table):
    node = table.node(mkdir(table, "a"))
    for i in range(XATTRS_MAX):
        table.setxattr(node, f"user.{i}".encode(), b"", ROOT)
    with raises_errno(errno.ENOSPC):
        table.setxattr(node, b"user.one-more", b"", ROOT)
    table.setxattr(node, b"user.0", b"x", ROOT)  # replacing takes no new name
    other = table.node(mkdir(table, "b"))
    table.setxattr(other, b"user.big", b"x" * (XATTR_BYTES_MAX - 1), ROOT)
    with raises_errno(errno.ENOSPC):
        table.setxattr(other, b"user.more", b"xx", ROOT)


def test_root_xattrs_of_the_daemon_are_read_only():
    engine = new_engine({"sev": 4}, controllers=(EncidsController,))
    table = Requests(changes_for(engine, tables=[encids_files],
                                 root_xattrs={"user.encidfs.pid": "1"}))
    root = table.node(ROOT_INODE)
    assert table.getxattr(root, b"user.encidfs.pid") == b"1"
    with raises_errno(errno.EPERM):
        table.setxattr(root, b"user.encidfs.pid", b"2", ROOT)
    with raises_errno(errno.EPERM):
        table.removexattr(root, b"user.encidfs.pid")


@pytest.fixture
def small(table) -> Requests:
    """xattr budgets of 100 bytes and 10 names: a user's share is a quarter."""
    table.xattrs.byte_budget = Budget("bytes", 100, errno.ENOSPC, OWNERS, 0.25)
    table.xattrs.name_budget = Budget("names", 10, errno.ENOSPC, OWNERS, 0.25)
    return table


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
