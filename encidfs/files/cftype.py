"""One row of an interface-file table, in the manner of the kernel's struct cftype."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

from ..engine import Cgroup
from ..engine.css import Controller
from ..state.operations import Op


class Placement(Enum):
    EVERYWHERE = "everywhere"
    ONLY_ON_ROOT = "only on root"  # CFTYPE_ONLY_ON_ROOT
    NOT_ON_ROOT = "not on root"  # CFTYPE_NOT_ON_ROOT


class Caller(NamedTuple):
    """Who opened the file: the write handlers act for it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups

    def may_write(self, mode: int, uid: int, gid: int) -> bool:
        """generic_permission() for MAY_WRITE; root (CAP_DAC_OVERRIDE) always may."""
        if self.uid == 0:
            return True
        if self.uid == uid:
            return bool(mode & 0o200)
        if self.gid == gid or gid in self.groups:
            return bool(mode & 0o020)
        return bool(mode & 0o002)


class Changes(Protocol):
    """What a write handler changes the state through (state/changes.py): handed to it with
    each write, as the kernel's handlers reach their cgroup through the open file."""

    def run(self, op: Op, *args: object) -> object:
        """Journal the change `op`, then apply it."""

    def vet_subtree_control(self, cgroup: int, enable: list[str],
                            disable: list[str]) -> tuple[int, int]:
        """The checks of a subtree_control change, as masks; nothing is changed."""


Show = Callable[[Cgroup], str]
ShowTo = Callable[[Cgroup, Caller], str]  # what the reader sees depends on who it is
Write = Callable[[Cgroup, bytes, Caller, Changes], None]


@dataclass(frozen=True)
class CfType:
    name: str
    show: Show | ShowTo | None = None
    write: Write | None = None  # gets the written text up to its first NUL, unstripped
    placement: Placement = Placement.EVERYWHERE
    controller: Controller | None = None  # present only where that controller has a css
    # The key the engine notifies this file by (the kernel's .file_offset to a cgroup_file):
    # poll(2) wakes once the file's content changed.
    notify: str | None = None
    # Shown a record at a time (seq_start/seq_next): a read that finds no record never runs
    # kernfs_seq_show(), so it does not catch up with the notifications, as poll(2) then shows.
    records: bool = False
    # show takes the reader (the opener) too: PIDs are shown as its PID namespace sees them.
    to_reader: bool = False

    @property
    def mode(self) -> int:
        """cgroup_file_mode(): readable by all if it shows, writable by the owner if it writes."""
        mode = 0
        if self.show:
            mode |= stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if self.write:
            mode |= stat.S_IWUSR
        return mode

    def present_in(self, cg: Cgroup) -> bool:
        if self.placement is Placement.ONLY_ON_ROOT and not cg.is_root:
            return False
        if self.placement is Placement.NOT_ON_ROOT and cg.is_root:
            return False
        return self.controller is None or cg.css[self.controller.ssid] is not None
