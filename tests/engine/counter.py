"""A controller used only by the tests, to prove that a controller is one engine module, one
file table and one registry line: `count` counts the processes of each subtree, as pids does,
and count.max refuses a move or a fork past it with EAGAIN (pids refuses forks only).

`encidfs mount --controller-module tests/engine/counter.py --controllers ...,count` offers it.
"""

from __future__ import annotations

import errno

from encidfs.daemon.controllers import register
from encidfs.engine import U64_MAX, Cgroup, fail
from encidfs.engine.css import Controller, Css, Report
from encidfs.engine.events import Commit
from encidfs.files.cftype import Caller, CfType, Changes, Placement
from encidfs.files.parse import kstrtoull, limit_text, strstrip
from encidfs.state.operations import Op

# -- the engine module ---------------------------------------------------------------------


class CountCss(Css):
    __slots__ = ("max", "count")

    def __init__(self, ssid: int, cgroup: Cgroup, parent: CountCss | None) -> None:
        super().__init__(ssid, cgroup, parent)
        self.max = U64_MAX
        self.count = 0  # processes of the subtree


class CountController(Controller[CountCss]):
    name = "count"

    def css_alloc(self, cgroup: Cgroup, parent: CountCss | None) -> CountCss:
        return CountCss(self.ssid, cgroup, parent)

    def css_of(self, cg: Cgroup) -> CountCss:
        css = self.cgroup_css(cg)
        assert css is not None, "its files are where it is"
        return css

    def can_attach(self, pid: int, src: CountCss, dst: CountCss) -> None:
        self._check(dst, set(_levels(src)))

    def attach(self, pid: int, src: CountCss, dst: CountCss) -> None:
        _add(src, -1)
        _add(dst, 1)

    def can_fork(self, css: CountCss) -> None:
        self._check(css, set())

    def fork(self, pid: int, css: CountCss) -> None:
        _add(css, 1)

    def exit(self, pid: int, css: CountCss) -> None:
        _add(css, -1)

    def _check(self, css: CountCss, counted: set[CountCss]) -> None:
        """One more process below css, but for the levels that count it already."""
        for level in _levels(css):
            if level not in counted and level.count + 1 > level.max:
                raise fail(errno.EAGAIN, f"count.max of {level.cgroup.path}")

    def apply_setting(self, cg: Cgroup, key: str, value: int, commit: Commit) -> None:
        if key != "max":
            super().apply_setting(cg, key, value, commit)
        css = self.css_of(cg)
        commit()
        css.max = value

    def report(self, css: CountCss, sparse: bool) -> Report:
        return {"processes": {"current": css.count,
                              "max": "max" if css.max == U64_MAX else css.max}}

    def resources(self) -> list[str]:
        return ["processes"]

    def dump_css(self, css: CountCss) -> dict:
        return {"max": css.max, "count": css.count}

    def load_css(self, css: CountCss, data: dict) -> None:
        css.max, css.count = data["max"], data["count"]


def _levels(css: CountCss) -> list[CountCss]:
    """css and its ancestors below the root: the root's processes are implicit, never counted."""
    return [level for level in css.ancestors() if level.parent is not None]


def _add(css: CountCss, step: int) -> None:
    for level in _levels(css):
        level.count += step


# -- the file table ------------------------------------------------------------------------


def count_files(controller: CountController) -> list[CfType]:
    def show_max(cg: Cgroup) -> str:
        value = controller.css_of(cg).max
        return limit_text(value) + "\n"

    def write_max(cg: Cgroup, text: bytes, caller: Caller, changes: Changes) -> None:
        text = strstrip(text)
        value = U64_MAX if text == b"max" else kstrtoull(text, 0)
        changes.run(Op.CONTROLLER_SETTING, cg.id, controller.name, "max", value)

    def show_current(cg: Cgroup) -> str:
        return f"{controller.css_of(cg).count}\n"

    not_on_root = Placement.NOT_ON_ROOT
    return [CfType("count.max", show_max, write_max, not_on_root, controller),
            CfType("count.current", show_current, None, not_on_root, controller)]


# -- the registry line ---------------------------------------------------------------------

register(CountController, count_files)
