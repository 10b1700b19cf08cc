"""The encids controller's files: encids.<type>.{max,current,events} and the root's .stat."""

from __future__ import annotations

from ..engine import U64_MAX, Cgroup, EncidsController
from ..engine.encids import events_file
from ..state.operations import Op
from .cftype import Caller, CfType, Changes, Placement
from .parse import kstrtoull, limit_text, strstrip


def encids_files(controller: EncidsController) -> list[CfType]:
    files: list[CfType] = []
    types = controller.types
    for t, type_name in enumerate(types.names):
        prefix = f"{controller.name}.{type_name}"

        def show_max(cg: Cgroup, t: int = t) -> str:
            return limit_text(controller.css_of(cg).max[t]) + "\n"

        def write_max(cg: Cgroup, text: bytes, caller: Caller, changes: Changes,
                      t: int = t) -> None:
            text = strstrip(text)
            value = U64_MAX if text == b"max" else kstrtoull(text, 0)
            changes.run(Op.CONTROLLER_SETTING, cg.id, controller.name, types.names[t], value)

        def show_current(cg: Cgroup, t: int = t) -> str:
            return f"{controller.css_of(cg).usage[t]}\n"

        def show_events(cg: Cgroup, t: int = t) -> str:
            return f"max {controller.css_of(cg).events[t]}\n"

        def show_stat(cg: Cgroup, t: int = t) -> str:
            return f"total {types.capacity[t]}\nused {controller.used(t)}\n"

        not_on_root, only_on_root = Placement.NOT_ON_ROOT, Placement.ONLY_ON_ROOT
        files += [
            CfType(f"{prefix}.max", show_max, write_max, not_on_root, controller),
            CfType(f"{prefix}.current", show_current, None, not_on_root, controller),
            CfType(f"{prefix}.events", show_events, None, not_on_root, controller,
                   notify=events_file(type_name)),
            CfType(f"{prefix}.stat", show_stat, None, only_on_root, controller),
        ]
    return files
