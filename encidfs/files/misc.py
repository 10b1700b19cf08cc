"""The misc controller's files, as kernel/cgroup/misc.c renders and parses them: flat-keyed,
a line a resource type.  A type is listed if it has a capacity (or, for usage, watermark and
events, a value other than 0).  Which files there are, and where, is the chosen kernel's
(engine/kernel.py)."""

from __future__ import annotations

import errno

from ..engine import U64_MAX, Cgroup, MiscController, fail
from ..engine.misc import MISC_EVENTS_KEY, MISC_EVENTS_LOCAL_KEY
from ..state.operations import Op
from .cftype import Caller, CfType, Changes, Placement
from .parse import kstrtoull, limit_text, strstrip


def parse_max(text: bytes, type_names: list[str]) -> tuple[str, int]:
    """misc_cg_max_write(): "TYPE VALUE", split once at the first space after strstrip();
    TYPE a known type, VALUE "max" or kstrtou64(VALUE, 0)."""
    token, space, value = strstrip(text).partition(b" ")
    name = token.decode("latin-1")
    if not space or name not in type_names:
        raise fail(errno.EINVAL, "misc.max takes a line \"TYPE max\" or \"TYPE N\"")
    return name, U64_MAX if value == b"max" else kstrtoull(value, 0)


def misc_files(controller: MiscController) -> list[CfType]:
    """The rows of controller.kernel's misc_cg_files[], showing the types it names."""
    types, kernel = controller.types, controller.kernel
    known = [t for t in range(len(types.names)) if t not in controller.unknown]
    names = [types.names[t] for t in known]

    def flat(values: list[int], suffix: str = "") -> str:
        return "".join(f"{types.names[t]}{suffix} {values[t]}\n" for t in known
                       if types.capacity[t] or values[t])

    def show_capacity(cg: Cgroup) -> str:
        return flat(types.capacity)

    def show_max(cg: Cgroup) -> str:
        maxes = controller.css_of(cg).max
        return "".join(f"{types.names[t]} {limit_text(maxes[t])}\n"
                       for t in known if types.capacity[t])

    def write_max(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        name, value = parse_max(text, names)
        changes.run(Op.CONTROLLER_SETTING, cg.id, controller.name, name, value)

    not_on_root = Placement.NOT_ON_ROOT
    current_on = Placement.EVERYWHERE if kernel.misc_current_on_root else not_on_root
    rows = [
        CfType("misc.capacity", show_capacity, None, Placement.ONLY_ON_ROOT, controller),
        CfType("misc.current", lambda cg: flat(controller.css_of(cg).usage), None, current_on,
               controller),
    ]
    if kernel.misc_peak:  # no write handler: misc.peak is not reset, unlike memory.peak
        rows.append(CfType("misc.peak", lambda cg: flat(controller.css_of(cg).peak), None,
                           controller=controller))
    rows.append(CfType("misc.max", show_max, write_max, not_on_root, controller))
    if kernel.misc_events:
        rows.append(CfType("misc.events", lambda cg: flat(controller.css_of(cg).events, ".max"),
                           None, not_on_root, controller, notify=MISC_EVENTS_KEY))
    if kernel.misc_events_local:
        rows.append(CfType("misc.events.local",
                           lambda cg: flat(controller.css_of(cg).events_local, ".max"), None,
                           not_on_root, controller, notify=MISC_EVENTS_LOCAL_KEY))
    return rows
