"""Stand-ins for what the file tables and the journal are given by the daemon, for tests that
need no mount: processes that are all there and all movable, and the changes built on them."""

from __future__ import annotations

import os

from encidfs.engine import Engine
from encidfs.files.encids import encids_files
from encidfs.files.kernfs import FileTableMaker, Kernfs
from encidfs.files.misc import misc_files
from encidfs.state.changes import Changes, Journal


class Processes:
    """Every process there and movable: the writes' own checks are the test's."""

    def thread_group(self, pid: int) -> int:
        return pid

    def all_pids(self) -> list[int]:
        return []

    def threads(self, pid: int) -> list[int]:
        return [pid]

    def sync(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def joined(self, pid: int) -> None:
        pass

    def watch(self, pid: int) -> int:
        return 100 + pid  # its start time

    def pid_from(self, caller: int, pid: int, thread: bool = False) -> int:
        return pid

    def pids_for(self, caller: int, pids: list[int]) -> list[int]:
        return pids

    def check_signalable(self, pid: int) -> None:
        pass

    def kill(self, pids) -> None:
        pass

    def apply_freezer(self, pids) -> None:
        pass


def changes_for(engine: Engine, journal: Journal | None = None,
                tables: list[FileTableMaker] | None = None, **options) -> Changes:
    """The engine's changes, with a kernfs on fake processes (its node attributes are
    `changes.kernfs`); `tables`: one per controller, encids' and misc's by default;
    `options`: the Kernfs's."""
    tables = [encids_files, misc_files] if tables is None else tables
    kernfs = Kernfs(engine.hierarchy, Processes(), tables, **options)
    return Changes(engine, kernfs, journal)


class Requests:
    """The file system as the FUSE adapter asks it: lookups and reads the kernfs's own,
    every change through the changes."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.kernfs = changes.kernfs

    def __getattr__(self, name: str):
        return getattr(self.kernfs, name)

    def setattr(self, node, **attributes) -> None:
        self.kernfs.setattr(node, self.changes, **attributes)

    def setxattr(self, node, name: bytes, value: bytes, caller) -> None:
        self.kernfs.setxattr(node, name, value, caller, self.changes)

    def removexattr(self, node, name: bytes) -> None:
        self.kernfs.removexattr(node, name, self.changes)

    def mkdir(self, parent_inode: int, name: bytes, mode: int, caller):
        return self.kernfs.mkdir(parent_inode, name, mode, caller, self.changes)

    def rmdir(self, parent_inode: int, name: bytes) -> None:
        self.kernfs.rmdir(parent_inode, name, self.changes)

    def open(self, node, caller, flags: int = os.O_RDONLY) -> OpenedFile:
        return OpenedFile(self.kernfs.open(node, caller, flags), self.changes)


class OpenedFile:
    """An open file whose writes go through the changes, as the adapter's do."""

    def __init__(self, opened, changes: Changes) -> None:
        self.opened = opened
        self.changes = changes

    def __getattr__(self, name: str):
        return getattr(self.opened, name)

    def write(self, buf: bytes) -> int:
        return self.opened.write(buf, self.changes)
