"""Controller states (css) and the interface every controller implements.

As in the kernel, a controller keeps one state object (a "css") per cgroup in which its parent
enables it.  A css outlives its cgroup's interest in it while something still pins it (a charge,
a child css): disabling the controller or removing the cgroup takes it offline, and it is released
only when the last pin goes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, Self, TypeVar, cast

from .errors import fail

if TYPE_CHECKING:
    from .cgroup import Cgroup, Hierarchy
    from .events import Commit
    from .kernel import KernelInterface
    from .resource import Types

# What a controller reports of a css (status, metrics, top): its figures by resource, each a
# number or "max" (no limit), e.g. {"sev": {"current": 2, "max": "max"}}.
Report = dict[str, dict[str, "int | str"]]


class Css:
    """One controller's state in one cgroup; a subclass adds the controller's own.  Its parent
    is the same controller's css in the parent cgroup: of the same class (Self)."""

    __slots__ = ("ssid", "cgroup", "parent", "online", "refs", "nr_descendants")

    def __init__(self, ssid: int, cgroup: Cgroup, parent: Self | None) -> None:
        self.ssid = ssid
        self.cgroup = cgroup
        self.parent = parent
        self.online = True
        # Pins: one while online, one per charge and per child css not yet released.
        self.refs = 1
        # Online csses below this one: the kernel's css->nr_descendants (cgroup.stat nr_subsys_*).
        self.nr_descendants = 0

    def ancestors(self) -> Iterator[Self]:
        """This css and its parents up to the root's."""
        css: Self | None = self
        while css is not None:
            yield css
            css = css.parent


CssT = TypeVar("CssT", bound=Css)


class Controller(Generic[CssT]):
    """What the hierarchy needs from a controller; one module per controller subclasses it,
    making its csses (CssT, a Css subclass with its own state) and overriding what else it
    needs: every other hook does nothing by default.  The hierarchy, which keeps controllers
    of every kind, sees each as a bare Controller (Controller[Any])."""

    name: str = ""
    # A threaded controller can be enabled in a threaded subtree and handles processes beside
    # child cgroups (cpu, pids); a domain controller (misc, encids) cannot and does not.
    threaded: bool = False
    ssid: int = -1  # index in the hierarchy's controller list, assigned by the hierarchy
    hierarchy: Hierarchy  # the hierarchy the controller is bound to, assigned by it

    def __init__(self, types: Types, kernel: KernelInterface) -> None:
        """Every controller is made alike (new_engine): with the host's resource types and the
        kernel whose interface the mount shows; one that needs neither ignores them."""

    def css_alloc(self, cgroup: Cgroup, parent: CssT | None) -> CssT:
        """A new css for cgroup, below the parent cgroup's (None at the root).  Every
        controller makes its own, as every cgroup_subsys has its css_alloc."""
        raise NotImplementedError

    def cgroup_css(self, cg: Cgroup) -> CssT | None:
        """cg's own css of this controller (the kernel's cgroup_css()): None unless cg's parent
        enables the controller."""
        # What css_alloc made: the cgroup's list holds every controller's, each in its ssid's
        # slot, and cannot say which class is where.
        return cast("CssT | None", cg.css[self.ssid])

    # A controller's own state in a css, for snapshots.

    def dump_css(self, css: CssT) -> dict:
        return {}

    def load_css(self, css: CssT, data: dict) -> None:
        pass

    # Processes, as cgroup_subsys has them: called for processes the hierarchy follows (its
    # root's are implicit), with the css of this controller that accounts for the process
    # (its cgroup's effective one).  A veto is an OSError with the errno the writer or the
    # fork gets; the hierarchy asks every controller before it changes anything.

    def can_attach(self, pid: int, src: CssT, dst: CssT) -> None:
        """Whether the process may move from src to dst (cgroup.procs)."""

    def attach(self, pid: int, src: CssT, dst: CssT) -> None:
        """The process moved from src to dst."""

    def can_fork(self, css: CssT) -> None:
        """Whether a process accounted to css may fork (pids' can_fork)."""

    def fork(self, pid: int, css: CssT) -> None:
        """A new process is accounted to css."""

    def exit(self, pid: int, css: CssT) -> None:
        """The process accounted to css is gone."""

    # Its settings and figures.

    def apply_setting(self, cg: Cgroup, key: str, value: int, commit: Commit) -> None:
        """A setting written to one of the controller's files (cg's `key` limit, for encids
        and misc the limit of a resource type), as the journal records and replays it: check,
        commit(), then change."""
        raise fail(errno.EINVAL, f"{self.name} has no setting {key!r}")

    def report(self, css: CssT, sparse: bool) -> Report:
        """The css's figures for status, metrics and top; `sparse`: a resource whose figures
        are a new css's may be left out."""
        return {}

    def resources(self) -> list[str]:
        """What report() may name, in order (top lists them even where it leaves them out)."""
        return []


def follows_processes(controller: Controller) -> bool:
    """Whether a controller has a process hook: the hierarchy asks only those, so that a move,
    a fork or an exit costs the others nothing."""
    return any(getattr(type(controller), hook) is not getattr(Controller, hook)
               for hook in ("can_attach", "attach", "can_fork", "fork", "exit"))
