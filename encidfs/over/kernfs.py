"""kernfs under --over: DIR's directories and the kernel's files, passed through, beside the
emulated controllers' files.

A directory is the kernel's cgroup (its owner, mode and times; mkdir and rmdir are the kernel's,
with its errno); a kernel file is opened for each open through the mount, and read, written
and polled through that descriptor, so its contents, errno and poll state are the kernel's own.
What the kernel cannot do for the daemon it is done here: PIDs are the caller's (its PID
namespace), and a move checks the caller's right to it as cgroup_procs_write_permission()
does for the opener (the daemon itself may move anything).  An emulated file is owned as the
kernel owns a file of that cgroup that nobody chowned (its cgroup.controllers).
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time

from ..engine import Cgroup, Hierarchy, fail
from ..engine.budget import Budget
from ..engine.events import Event
from ..files.cftype import Caller, Changes
from ..files.kernfs import (
    FILE_BASE,
    ROOT_INODE,
    STRIDE,
    FileTableMaker,
    Kernfs,
    Node,
    NodeAttr,
)
from ..files.openfile import FileHandle
from ..files.parse import kstrtoint, strstrip, written_text
from .files import CONTROLLERS_FILE, MERGED, merged_files
from .membership import KernelMembership
from .tree import KernelTree, proc_cgroup

_PID_FILES = ("cgroup.procs", "cgroup.threads")


class OverKernfs(Kernfs):
    def __init__(self, hierarchy: Hierarchy, tree: KernelTree, membership: KernelMembership,
                 file_tables: list[FileTableMaker],
                 descriptors: int = 1 << 20, owners: frozenset[int] = frozenset({0}),
                 share: float = 1.0, root_xattrs: dict[str, str] | None = None) -> None:
        """`descriptors`: how many the kernel's files open through the mount may hold (each
        open holds one), shared out to the users as the xattrs are."""
        self.tree = tree
        self.descriptors = Budget("kernel files open through the mount", descriptors,
                                  errno.ENFILE, owners, share)
        self.membership = membership
        # The kernel's cgroup.procs and threads replace the core rows that move processes:
        # all Kernfs itself asks of the membership is settle().
        super().__init__(hierarchy, membership, file_tables,
                         core=lambda h, processes, may_write: merged_files(tree, h),
                         owners=owners, share=share, root_xattrs=root_xattrs)
        # The kernel's file names, each given a slot the first time it is seen (the names
        # are the kernel's: a few hundred at most).
        self._real_names: list[str] = []
        self._real_rows: dict[str, int] = {}  # name -> row, after the emulated rows
        self._chown = os.geteuid() == 0  # a user's daemon makes what it makes as the user
        # Removed by an rmdir through the mount, until the event bus hands the removal over.
        self._removed_here: set[Cgroup] = set()

    # -- nodes --------------------------------------------------------------------------------

    def _real_row(self, name: str) -> int:
        row = self._real_rows.get(name)
        if row is None:
            row = len(self.cftypes) + len(self._real_names)
            if FILE_BASE + row >= STRIDE:
                raise fail(errno.ENFILE, "more kernel file names than inode slots")
            self._real_names.append(name)
            self._real_rows[name] = row
        return row

    def _real_node(self, cg: Cgroup, name: str) -> Node:
        return Node(self.file_inode(cg, self._real_row(name)), cg, None, name)

    def _slots(self) -> int:
        return len(self.cftypes) + len(self._real_names)

    def node(self, inode: int) -> Node:
        cgid, slot = divmod(inode, STRIDE)
        index = slot - FILE_BASE - len(self.cftypes)
        if index < 0:
            return super().node(inode)
        cg = self.hierarchy.by_id.get(cgid)
        if cg is None or index >= len(self._real_names):
            raise fail(errno.ENOENT)
        return Node(inode, cg, None, self._real_names[index])

    def lookup(self, parent_inode: int, name: bytes) -> Node:
        cg = self._dir(parent_inode)
        self.tree.drain()
        text = os.fsdecode(name)
        file = self._file(cg, text)
        if file is not None:
            return file
        try:
            st = os.lstat(f"{self.tree.path(cg)}/{text}")
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            return self._real_node(cg, text)
        child = self.tree.found(cg, text, st)
        if child is None:
            raise fail(errno.ENOENT)
        return Node(self.dir_inode(child), child, None)

    def entries(self, dir_inode: int) -> list[tuple[bytes, Node]]:
        cg = self._dir(dir_inode)
        self.tree.drain()
        entries = self._dots_and_files(cg)
        children = set()
        for entry in os.scandir(self.tree.path(cg)):
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                child = self.tree.found(cg, name, entry.stat(follow_symlinks=False))
                if child is not None:
                    children.add(name)
                    entries.append((os.fsencode(name), Node(self.dir_inode(child), child, None)))
                continue
            if self._file(cg, name) is None:
                entries.append((os.fsencode(name), self._real_node(cg, name)))
        for name in [name for name in cg.children if name not in children]:
            self.tree.found(cg, name, None)  # removed since the mirror last heard
        return entries

    def _path(self, node: Node) -> str:
        """The kernel's node behind a directory, a kernel file or a merged file."""
        if node.real is not None:
            return self.tree.file(node.cgroup, node.real)
        if node.cftype is not None:
            return self.tree.file(node.cgroup, node.cftype.name)
        return self.tree.path(node.cgroup)  # a directory

    def _passed_through(self, node: Node) -> bool:
        return node.cftype is None or node.cftype.name in MERGED

    def attr(self, node: Node) -> NodeAttr:
        cg = node.cgroup
        if cg.dying:
            raise fail(errno.ENOENT)
        if node.is_dir:
            st = self._lstat(self.tree.path(cg))
            if not cg.is_root and not self.tree.check(cg, st):
                raise fail(errno.ENOENT)
        elif self._passed_through(node):
            st = self._lstat(self._path(node))
        else:
            assert node.cftype is not None, "a file not passed through is an emulated one"
            changed = self._file_attrs.get(node.inode)
            if changed is not None:
                return changed
            st = self._lstat(self.tree.file(cg, CONTROLLERS_FILE))
            if st is None:
                raise fail(errno.ENOENT)
            return NodeAttr(stat.S_IFREG | node.cftype.mode, st.st_uid, st.st_gid,
                            st.st_mtime_ns, st.st_ctime_ns)
        if st is None:
            raise fail(errno.ENOENT)
        return NodeAttr(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns)

    def entry_cached(self, node: Node) -> bool:
        """The kernel's nodes change behind the daemon's back (a cgroup removed by systemd, a
        file chowned for a delegation): they are looked up afresh at every path walk, which
        also brings their attributes, so that the mount shows them as they are at once."""
        return not self._passed_through(node)

    @staticmethod
    def _lstat(path: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def setattr(self, node: Node, changes: Changes, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None) -> None:
        if not self._passed_through(node):
            super().setattr(node, changes, mode, uid, gid, mtime_ns)
            return
        self.attr(node)  # ENOENT once removed
        path = self._path(node)
        if mode is not None:
            os.chmod(path, stat.S_IMODE(mode), follow_symlinks=False)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid,
                     follow_symlinks=False)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    # -- extended attributes: the kernel's, but the daemon's own on the root -------------------

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if node.inode == ROOT_INODE and name in self.root_xattrs:
            return self.root_xattrs[name]
        if not self._passed_through(node):
            return super().getxattr(node, name)
        return os.getxattr(self._path(node), name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[bytes]:
        if not self._passed_through(node):
            return super().listxattr(node)
        names = [os.fsencode(n) for n in os.listxattr(self._path(node), follow_symlinks=False)]
        return [*self.root_xattrs, *names] if node.inode == ROOT_INODE else names

    def setxattr(self, node: Node, name: bytes, value: bytes, caller: Caller,
                 changes: Changes) -> None:
        if node.inode == ROOT_INODE and name in self.root_xattrs:
            raise fail(errno.EPERM)
        if not self._passed_through(node):
            super().setxattr(node, name, value, caller, changes)
            return
        os.setxattr(self._path(node), name, value, follow_symlinks=False)

    def removexattr(self, node: Node, name: bytes, changes: Changes) -> None:
        if node.inode == ROOT_INODE and name in self.root_xattrs:
            raise fail(errno.EPERM)
        if not self._passed_through(node):
            super().removexattr(node, name, changes)
            return
        os.removexattr(self._path(node), name, follow_symlinks=False)

    # -- directories: the kernel's ------------------------------------------------------------

    def mkdir(self, parent_inode: int, name: bytes, mode: int, caller: Caller,
              changes: Changes) -> Node:
        """The kernel's mkdir: the mirror journals the new cgroup when it sees it."""
        parent = self._dir(parent_inode)
        text = os.fsdecode(name)
        if self._file(parent, text) is not None:
            raise fail(errno.EEXIST)
        path = f"{self.tree.path(parent)}/{text}"
        os.mkdir(path, stat.S_IMODE(mode))
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode):  # the daemon's umask took some
            os.chmod(path, stat.S_IMODE(mode))
        if self._chown and (caller.uid, caller.gid) != (st.st_uid, st.st_gid):
            # cgroup_mkdir() makes the directory and its files as the caller's fsuid/fsgid.
            for entry in [path, *(f"{path}/{file}" for file in os.listdir(path))]:
                os.chown(entry, caller.uid, caller.gid, follow_symlinks=False)
        self.tree.drain()  # this mkdir's own event, now rather than in a wake-up of its own
        child = self.tree.found(parent, text, os.lstat(path))
        if child is None:
            raise fail(errno.ENOENT)  # removed at once by someone else
        return Node(self.dir_inode(child), child, None)

    def rmdir(self, parent_inode: int, name: bytes, changes: Changes) -> None:
        parent = self._dir(parent_inode)
        node = self.lookup(parent_inode, name)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        os.rmdir(self.tree.path(node.cgroup))
        self._removed_here.add(node.cgroup)
        self.tree.found(parent, node.cgroup.name, None)
        self.tree.drain()  # this rmdir's own events, now rather than in a wake-up of their own

    # -- files --------------------------------------------------------------------------------

    def open(self, node: Node, caller: Caller, flags: int = os.O_RDONLY) -> FileHandle:
        if node.real is None:
            return super().open(node, caller, flags)
        self.descriptors.check(caller.uid)
        opened = KernelFile(self, node, node.real, caller, flags)
        self.descriptors.take(caller.uid)
        return opened

    def closed(self, uid: int) -> None:
        """A kernel file of this user's is closed."""
        self.descriptors.give(uid)

    # -- what changed -------------------------------------------------------------------------

    def consume(self, batch: list[Event]) -> tuple[list[tuple[int, bytes]], list[int]]:
        stale, notified = super().consume(batch)
        for change, cg in batch:
            row = self._real_rows.get(change) if isinstance(change, str) else None
            if row is not None and change not in self._rows_by_notify and not cg.dying:
                inode = self.file_inode(cg, row)
                self._notified[inode] = self._notified.get(inode, 0) + 1
                notified.append(inode)
        return stale, notified

    def _removed(self, cg: Cgroup, stale: list[tuple[int, bytes]]) -> None:
        # Removed by anyone else: the kernel's cache of this mount may still have the entry
        # (an rmdir through the mount drops it itself, holding the directory's lock meanwhile).
        if cg in self._removed_here:
            self._removed_here.discard(cg)
        else:
            assert cg.parent is not None, "the root is never removed"
            stale.append((self.dir_inode(cg.parent), os.fsencode(cg.name)))

    def files_notified_by(self, key: str, cg: Cgroup) -> list[str]:
        if key in self._real_rows and key not in self._rows_by_notify:
            return [] if cg.dying else [key]
        return super().files_notified_by(key, cg)

    # -- snapshots: the emulated files' modes, owners and xattrs (the rest is the kernel's) -----

    def dump(self) -> dict:
        nodes: dict[str, dict] = {}

        def entry(inode: int) -> tuple[dict, str]:
            cgid, name = self._id_and_name(inode)
            return nodes.setdefault(str(cgid), {"attrs": {}, "xattrs": {}}), name

        self._dump_files(entry)
        return nodes

    def load(self, nodes: dict) -> None:
        now = time.time_ns()  # times are not kept: a restarted daemon's start its own
        for cgid_text, entry in nodes.items():
            cg = self.hierarchy.by_id.get(int(cgid_text))
            if cg is not None:  # the kernel's tree has lost it since
                self._load_files(cg, entry, now)


class KernelFile:
    """A kernel file open through the mount: one descriptor of the kernel's file, so that its
    reads, writes and poll state are the kernel's."""

    __slots__ = ("kernfs", "node", "name", "caller", "fd", "_watch", "_text")

    def __init__(self, kernfs: OverKernfs, node: Node, name: str, caller: Caller,
                 flags: int) -> None:
        """`name`: the node's, a kernel file's (node.real)."""
        self.kernfs = kernfs
        self.node = node
        self.name = name
        self.caller = caller
        self.fd = os.open(kernfs.tree.file(node.cgroup, name),
                          (flags & os.O_ACCMODE) | os.O_CLOEXEC)
        self._watch: int | None = None  # the inotify watch of a file polled
        self._text = b""  # a PID list rendered for a reader in another PID namespace

    def read(self, offset: int, size: int) -> bytes:
        membership = self.kernfs.membership
        if self.name in _PID_FILES and membership.foreign(self.caller.pid):
            if offset == 0 or not self._text:
                text = os.pread(self.fd, 1 << 20, 0)
                while chunk := os.pread(self.fd, 1 << 20, len(text)):
                    text += chunk
                pids = membership.pids_for(self.caller.pid, [int(p) for p in text.split()])
                self._text = "".join(f"{pid}\n" for pid in pids).encode()
            return self._text[offset:offset + size]
        return os.pread(self.fd, size, offset)

    def write(self, buf: bytes, changes: Changes) -> int:
        """Written to the kernel's file, which changes nothing the journal keeps."""
        written = self._pid_written(buf) if self.name in _PID_FILES else buf
        if self.name == "cgroup.type" and strstrip(written_text(buf)) == b"threaded":
            self._check_threaded()
        os.write(self.fd, written)
        return len(buf)

    def _check_threaded(self) -> None:
        """cgroup_enable_threaded() for the controllers the kernel does not know: neither the
        cgroup nor its parent (the thread root to be) may enable an emulated domain one."""
        cg, h = self.node.cgroup, self.kernfs.hierarchy
        domain = h.all_controllers & ~h.threaded_controllers
        if cg.subtree_control & domain or (cg.parent and cg.parent.subtree_control & domain):
            raise fail(errno.EOPNOTSUPP, "an emulated domain controller is enabled")

    def _pid_written(self, buf: bytes) -> bytes:
        """A PID (TID) as the caller names it, as the daemon names it; the caller's own for 0.
        Text that is no PID goes to the kernel as it is, for its errno."""
        try:
            pid = kstrtoint(strstrip(written_text(buf)), 0)
        except OSError:
            return buf
        if pid < 0:
            return buf
        membership = self.kernfs.membership
        thread = self.name == "cgroup.threads"
        pid = membership.pid_from(self.caller.pid, pid, thread) if pid else self.caller.pid
        if not os.path.exists(f"/proc/{pid}"):
            return str(pid).encode()  # the kernel's ESRCH
        if self.caller.uid != 0:
            self._check_migration(pid)
        self._vet_destination()
        return str(pid).encode()

    def _vet_destination(self) -> None:
        """cgroup_migrate_vet_dst() for the controllers the kernel does not know: no process
        or thread joins a cgroup (other than the hierarchy's root) that enables an emulated
        domain controller (such a cgroup is neither threaded nor a thread root)."""
        cg, h = self.node.cgroup, self.kernfs.hierarchy
        if not cg.subtree_control & ~h.threaded_controllers:
            return
        if self.kernfs.membership.is_hierarchy_root(cg):
            return
        raise fail(errno.EBUSY, "no internal processes: the cgroup enables a controller")

    def _check_migration(self, pid: int) -> None:
        """cgroup_procs_write_permission(): the opener must be able to write cgroup.procs of
        the common ancestor of source and destination (the kernel checks the daemon)."""
        source = self.kernfs.tree.real_path(proc_cgroup(pid))
        if source is None:
            return  # gone, or outside the hierarchy: the kernel answers
        destination = self.kernfs.tree.path(self.node.cgroup)
        common = os.path.commonpath([source, destination])
        try:
            st = os.stat(f"{common}/cgroup.procs")
        except FileNotFoundError:
            raise fail(errno.ENOENT) from None
        if not self.caller.may_write(st.st_mode, st.st_uid, st.st_gid):
            raise fail(errno.EACCES, f"no write access to {common}/cgroup.procs")

    def changed(self) -> bool:
        """The kernel's poll state of this descriptor; the file is watched from the first
        poll on, so that a change wakes the poller."""
        if self._watch is None:
            self._watch = self.kernfs.tree.opened(self.node.cgroup, self.name) or -1
        poller = select.poll()
        poller.register(self.fd, select.POLLPRI)
        return bool(poller.poll(0))

    def close(self) -> None:
        os.close(self.fd)
        self.kernfs.closed(self.caller.uid)
        if self._watch is not None and self._watch >= 0:
            self.kernfs.tree.closed(self._watch)

