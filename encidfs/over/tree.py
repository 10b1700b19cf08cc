"""The kernel's cgroup v2 tree under --over: its cgroups mirrored into the engine as the kernel
makes and removes them, and the notifications of its files.

Every cgroup of DIR's tree has an engine cgroup, known by the kernel's cgroup ID (the inode
number of its directory), so that an emulated controller's state belongs to the cgroup and not
to its path: a cgroup removed while charged dies as the kernel's does, and a new one at the same
path starts afresh.  inotify tells of directories made and removed (by anyone: systemd, runc,
libvirt) and of the kernel's notifications of its files (kernfs_notify() raises IN_MODIFY);
each directory and each cgroup.events is watched, and any other file while it is open through
the mount.  A lookup that finds the kernel's tree other than the mirror (a queue that
overflowed, a watch the user's inotify limit refused) brings the mirror up to date at once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from inotify_simple import INotify, flags

from ..engine import CGROUP_EVENTS_KEY, Cgroup, Hierarchy
from ..host.mountinfo import cgroup2_mount_of
from ..state.operations import Op

log = logging.getLogger(__name__)

_DIR_EVENTS = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR
_MADE = flags.CREATE | flags.MOVED_TO
_GONE = flags.DELETE | flags.MOVED_FROM

Fact = Callable[..., None]  # Changes.fact: (op, *arguments)


def proc_cgroup(pid: int) -> str | None:
    """The cgroup v2 path of a process (or thread) as /proc tells it; None once it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            for line in f:
                if line.startswith(b"0::"):
                    return os.fsdecode(line[3:].rstrip(b"\n"))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def kernel_controllers(top: str) -> list[str]:
    """The controllers the kernel's hierarchy has, as the root of its mount lists them."""
    mount = cgroup2_mount_of(top)
    if mount is None:
        return []
    with open(f"{mount.mountpoint}/cgroup.controllers") as f:
        return f.read().split()


class KernelTree:
    def __init__(self, top: str, hierarchy: Hierarchy, fact: Fact) -> None:
        """`top`: DIR as a real path; `fact` records and applies the mirror's changes (the
        journal's Op.APPEARED and Op.VANISHED)."""
        mount = cgroup2_mount_of(top)
        if mount is None:
            raise ValueError(f"{top} is not in a cgroup v2 hierarchy")
        self.top = top
        self._mountpoint, self._mount_root = mount
        self.hierarchy = hierarchy
        self._fact = fact
        # DIR is the hierarchy's own root (not a cgroup below it, nor a cgroup namespace's).
        self.is_hierarchy_root = top == mount.mountpoint and mount.root == "/"
        self._inotify = INotify(nonblocking=True)
        self._watched: dict[int, tuple[Cgroup, str | None]] = {}  # wd -> (cgroup, file or dir)
        self._watches_of: dict[Cgroup, list[int]] = {}  # the watches kept with each cgroup
        self._opened: dict[int, int] = {}  # wd of a file watched while open -> open files
        self._refused = False  # a watch refused (logged once)

    def fileno(self) -> int:
        return self._inotify.fileno()

    # -- paths ------------------------------------------------------------------------------------

    def path(self, cg: Cgroup) -> str:
        return self.top + ("" if cg.is_root else cg.path)

    def file(self, cg: Cgroup, name: str) -> str:
        return f"{self.path(cg)}/{name}"

    def read(self, cg: Cgroup, name: str) -> str:
        with open(self.file(cg, name), "rb") as f:
            return f.read().decode("latin-1")

    def write(self, cg: Cgroup, name: str, text: str) -> None:
        fd = os.open(self.file(cg, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode("latin-1"))
        finally:
            os.close(fd)

    def real_path(self, path: str | None) -> str | None:
        """Where the cgroup of a /proc/PID/cgroup path is (the path is relative to the daemon's
        cgroup namespace, as the mount's root is); None for none, or one this mount cannot
        reach."""
        root = self._mount_root.rstrip("/")
        if path is None or (path != root and not path.startswith(root + "/")):
            return None
        return self._mountpoint.rstrip("/") + path[len(root):]

    def cgroup_at(self, path: str | None) -> Cgroup:
        """The cgroup of a /proc/PID/cgroup path: DIR's root for one outside DIR."""
        real = self.real_path(path)
        if real is None or (real != self.top and not real.startswith(self.top.rstrip("/") + "/")):
            return self.hierarchy.root
        cg = self.hierarchy.root
        for name in filter(None, real[len(self.top):].split("/")):
            child = self.child(cg, name)
            if child is None:
                break  # removed as it was read: the process moved on meanwhile
            cg = child
        return cg

    # -- the mirror ---------------------------------------------------------------------------

    def child(self, cg: Cgroup, name: str) -> Cgroup | None:
        """cg's child cgroup `name` as the kernel has it now, mirrored if it was not."""
        try:
            st = os.lstat(f"{self.path(cg)}/{name}")
        except FileNotFoundError:
            st = None
        except NotADirectoryError:  # cg itself is gone
            st = None
        return self.found(cg, name, st)

    def check(self, cg: Cgroup, st: os.stat_result | None) -> bool:
        """Whether cg (not the root) is still the kernel's cgroup at its path, given the
        path's lstat (None for nothing there); the mirror follows what it is now."""
        assert cg.parent is not None
        if st is not None and st.st_ino == cg.id and stat.S_ISDIR(st.st_mode):
            return True
        if not cg.dying:
            self.found(cg.parent, cg.name, st)
        return False

    def found(self, parent: Cgroup, name: str, st: os.stat_result | None) -> Cgroup | None:
        child = parent.children.get(name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            if child is not None:
                self._vanish(child)
            return None
        if child is not None and child.id != st.st_ino:
            self._vanish(child)  # removed, and another made at its path
            child = None
        if child is None:
            if parent.dying:
                return None
            self._fact(Op.APPEARED, parent.id, name, st.st_ino)
            child = parent.children[name]
            self._watch_cgroup(child)
        return child

    def _vanish(self, cg: Cgroup) -> None:
        for node in self.hierarchy.subtree(cg):
            for wd in self._watches_of.pop(node, ()):
                self._unwatch(wd)
        self._fact(Op.VANISHED, cg.id)

    def reconcile(self) -> int:
        """Bring the whole mirror in line with the kernel's tree (at start, and after the
        kernel's event queue overflowed): one walk, no recursion.  How many cgroups of the
        mirror were gone."""
        gone = 0
        root = self.hierarchy.root
        if root not in self._watches_of:
            self._watch_cgroup(root)
        stack = [root]
        while stack:
            cg = stack.pop()
            try:
                entries = {entry.name: entry.stat(follow_symlinks=False)
                           for entry in os.scandir(self.path(cg)) if entry.is_dir()}
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile: its parent's walk (or the next event) tells
            for name in [name for name in cg.children if name not in entries]:
                gone += sum(1 for _ in self.hierarchy.subtree(cg.children[name]))
                self._vanish(cg.children[name])
            for name, st in entries.items():
                child = self.found(cg, name, st)
                if child is not None:
                    if child not in self._watches_of:
                        self._watch_cgroup(child)
                    stack.append(child)
        return gone

    # -- inotify --------------------------------------------------------------------------------

    def _watch_cgroup(self, cg: Cgroup) -> None:
        watches = self._watches_of.setdefault(cg, [])
        path = self.path(cg)
        for name, mask in ((None, _DIR_EVENTS), (CGROUP_EVENTS_KEY, flags.MODIFY)):
            wd = self._add_watch(path if name is None else f"{path}/{name}", mask)
            if wd is not None:
                self._watched[wd] = (cg, name)
                watches.append(wd)

    def _add_watch(self, path: str, mask: int) -> int | None:
        try:
            return self._inotify.add_watch(path, mask | flags.DONT_FOLLOW)
        except FileNotFoundError:
            return None  # gone, or a file the cgroup does not have (the hierarchy's root)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            if not self._refused:
                self._refused = True
                log.warning("inotify watches exhausted (fs.inotify.max_user_watches): cgroups "
                            "made or removed elsewhere are seen when looked up")
            return None

    def _unwatch(self, wd: int) -> None:
        self._watched.pop(wd, None)
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # the kernel dropped it with its inode

    def opened(self, cg: Cgroup, name: str) -> int | None:
        """A file opened through the mount: watched for its notifications until closed()."""
        wd = self._add_watch(self.file(cg, name), flags.MODIFY)
        if wd is not None:
            self._watched[wd] = (cg, name)
            self._opened[wd] = self._opened.get(wd, 0) + 1
        return wd

    def closed(self, wd: int) -> None:
        left = self._opened.pop(wd, 1) - 1
        if left:
            self._opened[wd] = left
        elif wd in self._watched and self._watched[wd][1] != CGROUP_EVENTS_KEY:
            self._unwatch(wd)

    def drain(self) -> bool:
        """Apply what inotify has told until now; whether anything changed."""
        events = self._inotify.read(timeout=0)
        for event in events:
            try:
                self._apply(event)
            except Exception:  # a bug: this event alone is lost, the next lookup corrects
                log.exception("cgroup tree: event %r failed", event)
        return bool(events)

    def _apply(self, event) -> None:
        if event.mask & flags.Q_OVERFLOW:
            log.warning("inotify queue overflowed: walking %s again", self.top)
            self.reconcile()
            return
        watched = self._watched.get(event.wd)
        if event.mask & flags.IGNORED:
            self._watched.pop(event.wd, None)
            self._opened.pop(event.wd, None)
            return
        if watched is None:
            return
        cg, name = watched
        if name is not None:  # a file's notification (cgroup_file_notify())
            if not cg.dying:
                self.hierarchy.events.append((name, cg))
        elif event.mask & (_MADE | _GONE) and event.mask & flags.ISDIR and not cg.dying:
            self.child(cg, event.name)
