"""kernfs: cgroups as directories, cftype rows as files, and their node attributes.

It plays kernfs's part: it names nodes, keeps their modes, owners and times, decides which files
a cgroup shows, and opens them (openfile.py runs their show/write handlers the way kernfs and
seq_file do).  Node numbers are computed, not stored: a cgroup's id and a file's row make its
inode number.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..engine import Cgroup, Hierarchy, TreeEvent, fail
from ..engine.events import Commit, Event
from ..state.operations import Op
from .cftype import Caller, CfType, Changes
from .core import Settles, core_files
from .openfile import FileHandle, OpenFile
from .xattrs import Xattrs, as_bytes, as_text

FileTableMaker = Callable[..., list[CfType]]  # (controller) -> its rows
# (hierarchy, processes, may_write) -> the rows every cgroup has besides its controllers'
CoreTableMaker = Callable[..., list[CfType]]

ROOT_INODE = 1
# Inode numbers per cgroup: its directory, then one per file row (and under --over, one per
# name of the kernel's files).
STRIDE = 4096
FILE_BASE = 2


@dataclass(slots=True)
class NodeAttr:
    mode: int  # including the file type bits
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class Node:
    inode: int
    cgroup: Cgroup
    cftype: CfType | None  # None for the cgroup's directory (or a kernel file)
    real: str | None = None  # under --over, the name of a kernel file passed through

    @property
    def is_dir(self) -> bool:
        return self.cftype is None and self.real is None


class Kernfs:
    def __init__(self, hierarchy: Hierarchy, processes: Settles,
                 file_tables: list[FileTableMaker], core: CoreTableMaker = core_files,
                 owners: frozenset[int] = frozenset({0}), share: float = 1.0,
                 root_xattrs: dict[str, str] | None = None) -> None:
        """`file_tables[ssid]` makes the rows of the hierarchy's controller `ssid`, `core` the
        cgroup.* rows, given `processes` (core_files needs them to be Processes; Kernfs itself
        only settles them).  Every change a request makes goes through the `changes` it is given,
        which make it durable first and then apply it here (the apply_* methods) or in the
        engine.  What users make it keep (xattrs) is shared out to them: `share` to each but
        `owners`.  `root_xattrs`: the daemon's own on the root, read-only."""
        self.hierarchy = hierarchy
        self.processes = processes
        self._controller_names: dict[int, set[str]] = {}
        controller_rows: list[CfType] = []
        for controller, make in zip(hierarchy.controllers, file_tables):
            rows = make(controller)
            self._controller_names[controller.ssid] = {cft.name for cft in rows}
            controller_rows += rows
        self.cftypes = core(hierarchy, processes, self._may_write)
        self.cftypes += controller_rows
        assert len(self.cftypes) <= STRIDE - FILE_BASE
        self._row_by_name = {cft.name: row for row, cft in enumerate(self.cftypes)}
        self._controller_rows = [row for row, cft in enumerate(self.cftypes) if cft.controller]
        # The files the engine notifies by key (kernfs_notify), by that key.
        self._rows_by_notify: dict[str, list[int]] = {}
        for row, cft in enumerate(self.cftypes):
            if cft.notify is not None:
                self._rows_by_notify.setdefault(cft.notify, []).append(row)
        self._notified: dict[int, int] = {}  # inode -> how many times it was notified
        now = time.time_ns()
        # The root is the mount owner's, as a delegated subtree is its delegatee's: root's, 0555
        # as on the kernel, for a mount made by root; the user's, 0755, for a user's own mount.
        owner, group = os.geteuid(), os.getegid()
        self._dir_attrs = {hierarchy.root.id: NodeAttr(
            stat.S_IFDIR | (0o555 if owner == 0 else 0o755), owner, group, now, now)}
        # Files are nodes of their own: they keep the owner the directory was created with.
        self._file_defaults = {hierarchy.root.id: NodeAttr(stat.S_IFREG, owner, group, now,
                                                           now)}
        self._file_attrs: dict[int, NodeAttr] = {}  # by inode; only files someone changed
        self.xattrs = Xattrs(owner, owners, share)
        self.root_xattrs = {os.fsencode(name): os.fsencode(value)
                            for name, value in (root_xattrs or {}).items()}

    # -- nodes --------------------------------------------------------------------------------

    @staticmethod
    def dir_inode(cg: Cgroup) -> int:
        return cg.id * STRIDE + ROOT_INODE

    @staticmethod
    def file_inode(cg: Cgroup, row: int) -> int:
        return cg.id * STRIDE + FILE_BASE + row

    def node(self, inode: int) -> Node:
        cgid, slot = divmod(inode, STRIDE)
        cg = self.hierarchy.by_id.get(cgid)
        if cg is None or slot < ROOT_INODE or slot - FILE_BASE >= len(self.cftypes):
            raise fail(errno.ENOENT)
        if slot == ROOT_INODE:
            return Node(inode, cg, None)
        cft = self.cftypes[slot - FILE_BASE]
        if not cft.present_in(cg):
            raise fail(errno.ENOENT)
        return Node(inode, cg, cft)

    def lookup(self, parent_inode: int, name: bytes) -> Node:
        cg = self._dir(parent_inode)
        text = os.fsdecode(name)
        child = cg.children.get(text)
        if child is not None:
            return Node(self.dir_inode(child), child, None)
        file = self._file(cg, text)
        if file is None:
            raise fail(errno.ENOENT)
        return file

    def entries(self, dir_inode: int) -> list[tuple[bytes, Node]]:
        """The directory's entries as readdir lists them, "." and ".." first."""
        cg = self._dir(dir_inode)
        entries = self._dots_and_files(cg)
        entries += [(os.fsencode(child.name), Node(self.dir_inode(child), child, None))
                    for child in cg.children.values()]
        return entries

    def _dots_and_files(self, cg: Cgroup) -> list[tuple[bytes, Node]]:
        """The first entries of cg's directory: "." and "..", then cg's interface files."""
        parent = cg.parent or cg
        entries = [(b".", Node(self.dir_inode(cg), cg, None)),
                   (b"..", Node(self.dir_inode(parent), parent, None))]
        entries += [(cft.name.encode(), Node(self.file_inode(cg, row), cg, cft))
                    for row, cft in enumerate(self.cftypes) if cft.present_in(cg)]
        return entries

    def _file(self, cg: Cgroup, name: str) -> Node | None:
        """cg's interface file of that name, None if cg has none."""
        row = self._row_by_name.get(name)
        if row is None or not self.cftypes[row].present_in(cg):
            return None
        return Node(self.file_inode(cg, row), cg, self.cftypes[row])

    def attr(self, node: Node) -> NodeAttr:
        if node.cgroup.dying:
            raise fail(errno.ENOENT)  # removed since it was looked up (or listed)
        if node.cftype is None:
            return self._dir_attrs[node.cgroup.id]
        changed = self._file_attrs.get(node.inode)
        if changed is not None:
            return changed
        default = self._file_defaults[node.cgroup.id]
        return NodeAttr(stat.S_IFREG | node.cftype.mode, default.uid, default.gid,
                        default.mtime_ns, default.ctime_ns)

    def entry_cached(self, node: Node) -> bool:
        """Whether the kernel may keep the node's directory entry (for the daemon's cache
        timeout): yes, whatever removes it is the daemon's doing, and invalidated."""
        return True

    def nlink(self, node: Node) -> int:
        return 2 + len(node.cgroup.children) if node.is_dir else 1

    def setattr(self, node: Node, changes: Changes, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None) -> None:
        """chmod/chown/utimes; the caller's right to do it was checked by the kernel.  Modes
        and owners are durable; times are not (a restarted daemon starts its own)."""
        self.attr(node)  # ENOENT once removed
        if mode is not None or uid is not None or gid is not None:
            changes.run(Op.SETATTR, node.cgroup.id, self._file_name(node), mode, uid, gid)
        attr = self._own_attr(node)
        if mtime_ns is not None:
            attr.mtime_ns = mtime_ns
        attr.ctime_ns = time.time_ns()

    def apply_setattr(self, cg: Cgroup, file: str, mode: int | None, uid: int | None,
                      gid: int | None, commit: Commit) -> None:
        node = self._named(cg, file)
        commit()
        attr = self._own_attr(node)
        if mode is not None:
            attr.mode = stat.S_IFMT(attr.mode) | stat.S_IMODE(mode)
        if uid is not None:
            attr.uid = uid
        if gid is not None:
            attr.gid = gid

    def _own_attr(self, node: Node) -> NodeAttr:
        """The node's attributes to change: a file's own, made from the defaults if need be."""
        attr = self.attr(node)
        if node.cftype is not None:
            attr = self._file_attrs.setdefault(node.inode, NodeAttr(
                attr.mode, attr.uid, attr.gid, attr.mtime_ns, attr.ctime_ns))
        return attr

    # -- extended attributes: requests and records (self.xattrs keeps them) --------------------

    def getxattr(self, node: Node, name: bytes) -> bytes:
        value = self._node_xattrs(node).get(name)
        if value is None:
            raise fail(errno.ENODATA)
        return value

    def listxattr(self, node: Node) -> list[bytes]:
        return list(self._node_xattrs(node))

    def setxattr(self, node: Node, name: bytes, value: bytes, caller: Caller,
                 changes: Changes) -> None:
        changes.run(Op.SETXATTR, node.cgroup.id, self._file_name(node), as_text(name),
                    as_text(value), caller.uid)

    def apply_setxattr(self, cg: Cgroup, file: str, name_text: str, value_text: str,
                       uid: int | None, commit: Commit) -> None:
        """`uid`: who sets it (a record written before xattrs were charged: the owner)."""
        node, name = self._named(cg, file), as_bytes(name_text)
        if node.inode == ROOT_INODE and name in self.root_xattrs:
            raise fail(errno.EPERM)
        self.xattrs.set(node.inode, name, as_bytes(value_text), uid, commit)

    def removexattr(self, node: Node, name: bytes, changes: Changes) -> None:
        changes.run(Op.REMOVEXATTR, node.cgroup.id, self._file_name(node), as_text(name))

    def apply_removexattr(self, cg: Cgroup, file: str, name_text: str, commit: Commit) -> None:
        node, name = self._named(cg, file), as_bytes(name_text)
        if node.inode == ROOT_INODE and name in self.root_xattrs:
            raise fail(errno.EPERM)
        self.xattrs.remove(node.inode, name, commit)

    def _node_xattrs(self, node: Node) -> dict[bytes, bytes]:
        own = self.xattrs.of(node.inode)
        return {**self.root_xattrs, **own} if node.inode == ROOT_INODE else own

    # -- directories --------------------------------------------------------------------------

    def mkdir(self, parent_inode: int, name: bytes, mode: int, caller: Caller,
              changes: Changes) -> Node:
        parent = self._dir(parent_inode)
        self.processes.settle()  # an exit may release dying cgroups that count in the limits
        cg = changes.run(Op.MKDIR, parent.id, os.fsdecode(name), stat.S_IMODE(mode),
                         caller.uid, caller.gid, self.hierarchy.clock())
        assert isinstance(cg, Cgroup), "the change returns what apply_mkdir() made"
        return Node(self.dir_inode(cg), cg, None)

    def apply_mkdir(self, parent: Cgroup, name: str, mode: int, uid: int, gid: int,
                    commit: Commit, at: int | None = None) -> Cgroup:
        if self._file(parent, name) is not None:
            raise fail(errno.EEXIST)
        cg = self.hierarchy.mkdir(parent, name, commit, at, creator=uid)
        now = time.time_ns()
        self._dir_attrs[cg.id] = NodeAttr(stat.S_IFDIR | mode, uid, gid, now, now)
        self._file_defaults[cg.id] = NodeAttr(stat.S_IFREG, uid, gid, now, now)
        return cg

    def rmdir(self, parent_inode: int, name: bytes, changes: Changes) -> None:
        node = self.lookup(parent_inode, name)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        self.processes.settle()  # a process that has exited is gone from the cgroup
        changes.run(Op.RMDIR, node.cgroup.id)

    def check_file_collisions(self, cg: Cgroup, enable: int) -> None:
        """The kernel cannot create a control file where a child has a directory of that name
        (EEXIST): asked before enabling a controller."""
        for ssid, names in self._controller_names.items():
            if enable & (1 << ssid):
                for child in cg.children.values():
                    if not names.isdisjoint(child.children):
                        raise fail(errno.EEXIST)

    def controller_files_made(self, cg: Cgroup, uid: int, gid: int) -> None:
        """After a subtree_control write: the controller files of cg's children are new nodes
        owned by the writer, as cgroup_add_file() makes them; disabled ones are gone with their
        attributes."""
        now = time.time_ns()
        for child in cg.children.values():
            for row in self._controller_rows:
                inode, cft = self.file_inode(child, row), self.cftypes[row]
                self._forget((inode,))
                if cft.present_in(child):
                    self._file_attrs[inode] = NodeAttr(stat.S_IFREG | cft.mode, uid, gid, now,
                                                       now)

    # -- file contents ------------------------------------------------------------------------

    def open(self, node: Node, caller: Caller, flags: int = os.O_RDONLY) -> FileHandle:
        if node.cftype is None:  # a directory: the kernel's files are over/kernfs.py's
            raise fail(errno.EISDIR)
        return OpenFile(self, node, node.cftype, caller)

    # -- what changed -------------------------------------------------------------------------

    def consume(self, batch: list[Event]) -> tuple[list[tuple[int, bytes]], list[int]]:
        """A batch of the engine's events, as nodes: directory entries the kernel may have
        cached that no longer stand, as (dir, name), and the files to notify pollers of."""
        stale: list[tuple[int, bytes]] = []
        notified: list[int] = []
        for change, cg in batch:
            if change is TreeEvent.FILES:
                stale += [(self.dir_inode(cg), self.cftypes[row].name.encode())
                          for row in self._controller_rows]
            elif change is TreeEvent.REMOVED:
                self._forget(range(self.dir_inode(cg), self.file_inode(cg, self._slots())))
                self._removed(cg, stale)
            else:  # a file key: cgroup_file_notify()
                for row in self._rows_by_notify.get(change, ()):
                    inode = self.file_inode(cg, row)
                    self._notified[inode] = self._notified.get(inode, 0) + 1
                    notified.append(inode)
        return stale, notified

    def _slots(self) -> int:
        """File slots in use per cgroup."""
        return len(self.cftypes)

    def _removed(self, cg: Cgroup, stale: list[tuple[int, bytes]]) -> None:
        del self._dir_attrs[cg.id], self._file_defaults[cg.id]
        # The kernel dropped the directory's entry itself: rmdir came through it.

    def notifications(self, inode: int) -> int:
        return self._notified.get(inode, 0)

    def files_notified_by(self, key: str, cg: Cgroup) -> list[str]:
        """The names of cg's files that the engine's notification `key` changes."""
        if cg.dying:
            return []
        return [self.cftypes[row].name for row in self._rows_by_notify.get(key, ())
                if self.cftypes[row].present_in(cg)]

    # -- snapshots (the durable state's checkpoints) -------------------------------------------

    def dump(self) -> dict:
        """Modes, owners and xattrs of every live cgroup's nodes, by cgroup id and file name
        ("" for the directory); times are not kept."""
        nodes: dict[str, dict] = {}
        for cg in self.hierarchy.subtree(self.hierarchy.root):
            directory, files = self._dir_attrs[cg.id], self._file_defaults[cg.id]
            nodes[str(cg.id)] = {"dir": [directory.mode, directory.uid, directory.gid],
                                 "files": [files.uid, files.gid], "attrs": {}, "xattrs": {}}

        def entry(inode: int) -> tuple[dict, str]:
            cgid, name = self._id_and_name(inode)
            return nodes[str(cgid)], name

        self._dump_files(entry)
        return nodes

    def _dump_files(self, entry: Callable[[int], tuple[dict, str]]) -> None:
        """The modes and owners of the files someone changed, and every node's xattrs, each into
        `entry(inode)`: the snapshot entry of its cgroup and its file name."""
        for inode, attr in self._file_attrs.items():
            node, name = entry(inode)
            node["attrs"][name] = [attr.mode, attr.uid, attr.gid]
        self.xattrs.dump(entry)

    def load(self, nodes: dict) -> None:
        """What dump() wrote, into a Kernfs whose hierarchy was loaded from the same snapshot."""
        now = time.time_ns()
        for cgid_text, entry in nodes.items():
            cg = self.hierarchy.by_id[int(cgid_text)]
            mode, uid, gid = entry["dir"]
            self._dir_attrs[cg.id] = NodeAttr(mode, uid, gid, now, now)
            uid, gid = entry["files"]
            self._file_defaults[cg.id] = NodeAttr(stat.S_IFREG, uid, gid, now, now)
            self._load_files(cg, entry, now)

    def _load_files(self, cg: Cgroup, entry: dict, at: int) -> None:
        """What _dump_files() wrote into cg's snapshot `entry`, with the times `at`.  What the
        snapshot's mount had on a file this one lacks (another kernel's misc, other
        controllers) goes with the file, as when a controller is disabled."""
        for name, (mode, uid, gid) in entry["attrs"].items():
            inode = self._inode_of(cg, name)
            if inode is not None:
                self._file_attrs[inode] = NodeAttr(mode, uid, gid, at, at)
        self.xattrs.load(entry, lambda name: self._inode_of(cg, name))

    def _id_and_name(self, inode: int) -> tuple[int, str]:
        cgid, slot = divmod(inode, STRIDE)
        return cgid, "" if slot == ROOT_INODE else self.cftypes[slot - FILE_BASE].name

    def _inode_of(self, cg: Cgroup, file: str) -> int | None:
        """cg's node by file name ("" for the directory), None if cg lacks it."""
        node = Node(self.dir_inode(cg), cg, None) if file == "" else self._file(cg, file)
        return None if node is None else node.inode

    def _named(self, cg: Cgroup, file: str) -> Node:
        """A node by cgroup and file name ("" for the directory); ENOENT if not present."""
        node = Node(self.dir_inode(cg), cg, None) if file == "" else self._file(cg, file)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    @staticmethod
    def _file_name(node: Node) -> str:
        return "" if node.cftype is None else node.cftype.name

    def _may_write(self, cg: Cgroup, name: str, caller: Caller) -> bool:
        if caller.uid == 0:
            return True  # CAP_DAC_OVERRIDE: no need to look the node up (every move asks)
        row = self._row_by_name[name]
        attr = self.attr(Node(self.file_inode(cg, row), cg, self.cftypes[row]))
        return caller.may_write(attr.mode, attr.uid, attr.gid)

    def _forget(self, inodes: Iterable[int]) -> None:
        # Most nodes have none of these: an empty table is not searched (rmdir's cost).
        for table in (self._file_attrs, self._notified):
            if table:
                for inode in inodes:
                    table.pop(inode, None)
        self.xattrs.forget(inodes)

    def _dir(self, inode: int) -> Cgroup:
        node = self.node(inode)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        return node.cgroup
