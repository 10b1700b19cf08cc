"""The two files that merge the kernel's controllers with the emulated ones under --over:
cgroup.controllers and cgroup.subtree_control.

Each controller keeps its own rules: a write's emulated tokens are checked by the engine, the
kernel's by the kernel, and a write naming both kinds applies all or nothing, as a write of
several tokens does on the kernel: the emulated part is checked first, then the kernel's part
written, then the emulated part applied; if that cannot be made durable, the kernel's part is
undone.
"""

from __future__ import annotations

import errno
import logging

from ..engine import Cgroup, Hierarchy, fail
from ..files.cftype import Caller, CfType, Changes
from ..files.parse import strstrip
from ..state.operations import Op
from .tree import KernelTree

log = logging.getLogger(__name__)

CONTROLLERS_FILE = "cgroup.controllers"
SUBTREE_CONTROL_FILE = "cgroup.subtree_control"
MERGED = (CONTROLLERS_FILE, SUBTREE_CONTROL_FILE)


def _line(names: list[str]) -> str:
    return " ".join(names) + "\n" if names else ""


def merged_files(tree: KernelTree, hierarchy: Hierarchy) -> list[CfType]:
    emulated = {controller.name for controller in hierarchy.controllers}

    def show_controllers(cg: Cgroup) -> str:
        return _line(tree.read(cg, CONTROLLERS_FILE).split()
                     + hierarchy.names(hierarchy.controllers_of(cg)))

    def show_subtree_control(cg: Cgroup) -> str:
        return _line(tree.read(cg, SUBTREE_CONTROL_FILE).split()
                     + hierarchy.names(cg.subtree_control))

    def write_subtree_control(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        enable: dict[str, None] = {}
        disable: dict[str, None] = {}
        kernels: list[bytes] = []
        for token in strstrip(text).split(b" "):
            name = token[1:].decode("latin-1")
            if not token:
                continue
            if name not in emulated:
                kernels.append(token)
            elif token[:1] == b"+":
                enable[name] = None
                disable.pop(name, None)
            elif token[:1] == b"-":
                disable[name] = None
                enable.pop(name, None)
            else:
                raise fail(errno.EINVAL, f"bad token {token!r}")
        changes.vet_subtree_control(cg.id, list(enable), list(disable))
        before = None
        if kernels:
            before = tree.read(cg, SUBTREE_CONTROL_FILE).split()
            tree.write(cg, SUBTREE_CONTROL_FILE, b" ".join(kernels).decode("latin-1"))
        try:
            changes.run(Op.SUBTREE_CONTROL, cg.id, list(enable), list(disable), caller.uid,
                        caller.gid)
        except BaseException:
            if before is not None:
                _undo(tree, cg, before)
            raise

    return [
        CfType(CONTROLLERS_FILE, show_controllers),
        CfType(SUBTREE_CONTROL_FILE, show_subtree_control, write_subtree_control),
    ]


def _undo(tree: KernelTree, cg: Cgroup, before: list[str]) -> None:
    """Put the kernel's subtree_control back as it was."""
    try:
        after = tree.read(cg, SUBTREE_CONTROL_FILE).split()
        tokens = [f"+{name}" for name in before if name not in after]
        tokens += [f"-{name}" for name in after if name not in before]
        if tokens:
            tree.write(cg, SUBTREE_CONTROL_FILE, " ".join(tokens))
    except OSError as error:
        log.error("%s: the kernel's part of a subtree_control write could not be undone: %s",
                  tree.path(cg), error.strerror)
