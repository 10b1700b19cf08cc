"""Controller states (css) and the interface every controller implements.

As in the kernel, a controller keeps one state object (a "css") per cgroup in which its parent
enables it.  A css outlives its cgroup's interest in it while something still pins it (a charge,
a child css): disabling the controller or removing the cgroup takes it offline, and it is released
only when the last pin goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cgroup import Cgroup, Hierarchy


class Css:
    __slots__ = ("ssid", "cgroup", "parent", "online", "refs", "nr_descendants")

    def __init__(self, ssid: int, cgroup: Cgroup, parent: Css | None) -> None:
        self.ssid = ssid
        self.cgroup = cgroup
        self.parent = parent
        self.online = True
        # Pins: one while online, one per charge and per child css not yet released.
        self.refs = 1
        # Online csses below this one: the kernel's css->nr_descendants (cgroup.stat nr_subsys_*).
        self.nr_descendants = 0

    def ancestors(self) -> Iterator[Css]:
        """This css and its parents up to the root's."""
        css: Css | None = self
        while css is not None:
            yield css
            css = css.parent


class Controller:
    """What the hierarchy needs from a controller; one module per controller subclasses it."""

    name: str = ""
    # A threaded controller can be enabled in a threaded subtree and handles processes beside
    # child cgroups (cpu, pids); a domain controller (misc, encids) cannot and does not.
    threaded: bool = False
    ssid: int = -1  # index in the hierarchy's controller list, assigned by the hierarchy
    hierarchy: Hierarchy  # the hierarchy the controller is bound to, assigned by it

    def css_alloc(self, cgroup: Cgroup, parent: Css | None) -> Css:
        return Css(self.ssid, cgroup, parent)

    # A controller's own state in a css, for snapshots.

    def dump_css(self, css: Css) -> dict:
        return {}

    def load_css(self, css: Css, data: dict) -> None:
        pass
