"""The misc controller's files, as kernel/cgroup/misc.c renders and parses them: flat-keyed,
a line a resource type.  A type is listed if it has a capacity (or, for usage, watermark and
events, a value other than 0)."""

from __future__ import annotations

import errno

from ..engine import U64_MAX, Cgroup, MiscController, fail
from ..engine.misc import EVENTS_FILE, EVENTS_LOCAL_FILE
from .cftype import Caller, CfType, Placement
from .core import Changes
from .parse import kstrtoull, strstrip


def parse_max(text: bytes, type_names: list[str]) -> tuple[str, int]:
    """misc_cg_max_write(): "TYPE VALUE", split once at the first space after strstrip();
    TYPE a known type, VALUE "max" or kstrtou64(VALUE, 0)."""
    token, space, value = strstrip(text).partition(b" ")
    name = token.decode("latin-1")
    if not space or name not in type_names:
        raise fail(errno.EINVAL, "misc.max takes a line \"TYPE max\" or \"TYPE N\"")
    return name, U64_MAX if value == b"max" else kstrtoull(value, 0)


def misc_files(controller: MiscController, changes: Changes) -> list[CfType]:
    types = controller.types

    def flat(values: list[int], suffix: str = "") -> str:
        return "".join(f"{name}{suffix} {value}\n"
                       for name, capacity, value in zip(types.names, types.capacity, values)
                       if capacity or value)

    def show_capacity(cg: Cgroup) -> str:
        return flat(types.capacity)

    def show_max(cg: Cgroup) -> str:
        maxes = controller.css_of(cg).max
        return "".join(f"{name} {'max' if value == U64_MAX else value}\n"
                       for name, capacity, value in zip(types.names, types.capacity, maxes)
                       if capacity)

    def write_max(cg: Cgroup, text: bytes, caller: Caller) -> None:
        name, value = parse_max(text, types.names)
        changes.run("set_max", cg.id, controller.name, name, value)

    not_on_root = Placement.NOT_ON_ROOT
    return [
        CfType("misc.capacity", show_capacity, None, Placement.ONLY_ON_ROOT, controller),
        CfType("misc.current", lambda cg: flat(controller.css_of(cg).usage), None,
               controller=controller),
        CfType("misc.peak", lambda cg: flat(controller.css_of(cg).peak), None,
               controller=controller),
        CfType("misc.max", show_max, write_max, not_on_root, controller),
        CfType("misc.events", lambda cg: flat(controller.css_of(cg).events, ".max"), None,
               not_on_root, controller, notify=EVENTS_FILE),
        CfType("misc.events.local", lambda cg: flat(controller.css_of(cg).events_local, ".max"),
               None, not_on_root, controller, notify=EVENTS_LOCAL_FILE),
    ]
