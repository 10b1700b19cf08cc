"""An open interface file: its reads, writes and poll state, as kernfs's file.c beside the
nodes of dir.c (kernfs.py)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Protocol

from ..engine import fail
from .cftype import Caller, CfType, Changes
from .parse import written_text

if TYPE_CHECKING:  # kernfs.py imports this module to open files: at run time, a cycle
    from .kernfs import Kernfs, Node

WRITE_MAX = 4096  # kernfs's atomic_write_len for cgroup files (PAGE_SIZE): longer is E2BIG


class FileHandle(Protocol):
    """What the FUSE adapter keeps for a file open through the mount, and asks of it: an
    interface file (OpenFile) or, under --over, a kernel file (over/kernfs.py)."""

    node: Node

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, buf: bytes, changes: Changes) -> int: ...

    def changed(self) -> bool: ...

    def close(self) -> None: ...


class OpenFile:
    """An open interface file; reads follow seq_file: offset 0 renders afresh, later offsets
    continue that rendering, so a reader in small pieces sees one consistent text."""

    __slots__ = ("kernfs", "node", "cftype", "caller", "_css", "_text", "_seen")

    def __init__(self, kernfs: Kernfs, node: Node, cftype: CfType, caller: Caller) -> None:
        """`cftype`: the node's, which a file has (open() checked)."""
        self.kernfs = kernfs
        self.node = node
        self.cftype = cftype
        self.caller = caller
        # A controller's file is gone with the css it showed; one made anew is another node.
        self._css = self._css_now()
        self._text = b""
        # kernfs: of->event starts at 0, behind every node's count (which starts at 1), so a
        # file not yet read polls as changed.
        self._seen = -1

    def _css_now(self) -> object:
        controller = self.cftype.controller
        return None if controller is None else self.node.cgroup.css[controller.ssid]

    def close(self) -> None:
        """The last release of the file: nothing to let go of."""

    def changed(self) -> bool:
        """Not read yet, or notified since last read (poll reports POLLPRI|POLLERR)."""
        return self._seen != self.kernfs.notifications(self.node.inode)

    def _check_live(self) -> CfType:
        cg, cft = self.node.cgroup, self.cftype
        if cg.dying or not cft.present_in(cg) or self._css_now() is not self._css:
            raise fail(errno.ENODEV)
        return cft

    def read(self, offset: int, size: int) -> bytes:
        cft = self._check_live()
        if cft.show is None:
            raise fail(errno.EINVAL)
        if offset == 0 or not self._text:
            self.kernfs.processes.settle()  # what exited is gone before anyone can look
            cg = self.node.cgroup
            text = cft.show(cg, self.caller) if cft.to_reader else cft.show(cg)  # type: ignore
            self._text = text.encode()
            if self._text or not cft.records:
                self._seen = self.kernfs.notifications(self.node.inode)
        return self._text[offset:offset + size]

    def write(self, buf: bytes, changes: Changes) -> int:
        """kernfs semantics: the offset is ignored and the whole buffer is one command, which
        changes the state through `changes`."""
        cft = self._check_live()
        if len(buf) > WRITE_MAX:
            raise fail(errno.E2BIG)
        if cft.write is None:
            raise fail(errno.EINVAL)
        self.kernfs.processes.settle()  # its checks see the processes as they are
        cft.write(self.node.cgroup, written_text(buf), self.caller, changes)
        return len(buf)
