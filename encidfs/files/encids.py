"""The encids controller's files: encids.<type>.{max,current,events} and the root's .stat."""

from __future__ import annotations

from ..engine import U64_MAX, Cgroup, EncidsController
from .cftype import Caller, CfType, Placement
from .core import Changes
from .parse import kstrtoull, strstrip


def _limit(value: int) -> str:
    return "max\n" if value == U64_MAX else f"{value}\n"


def encids_files(controller: EncidsController, changes: Changes) -> list[CfType]:
    files: list[CfType] = []
    for t, type_name in enumerate(controller.types):
        prefix = f"{controller.name}.{type_name}"

        def show_max(cg: Cgroup, t: int = t) -> str:
            return _limit(controller.css_of(cg).max[t])

        def write_max(cg: Cgroup, text: bytes, caller: Caller, t: int = t) -> None:
            text = strstrip(text)
            value = U64_MAX if text == b"max" else kstrtoull(text, 0)
            changes.run("set_max", cg.id, controller.name, controller.types[t], value)

        def show_current(cg: Cgroup, t: int = t) -> str:
            return f"{controller.css_of(cg).usage[t]}\n"

        def show_events(cg: Cgroup, t: int = t) -> str:
            return f"max {controller.css_of(cg).events[t]}\n"

        def show_stat(cg: Cgroup, t: int = t) -> str:
            return f"total {controller.capacity[t]}\nused {controller.used(t)}\n"

        files += [
            CfType(f"{prefix}.max", show_max, write_max, Placement.NOT_ON_ROOT, controller),
            CfType(f"{prefix}.current", show_current, None, Placement.NOT_ON_ROOT, controller),
            CfType(f"{prefix}.events", show_events, None, Placement.NOT_ON_ROOT, controller),
            CfType(f"{prefix}.stat", show_stat, None, Placement.ONLY_ON_ROOT, controller),
        ]
    return files
