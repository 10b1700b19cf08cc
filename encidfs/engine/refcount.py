"""Pins, and what dropping the last one releases: the kernel's css and cgroup reference
counting (css_put(), cgroup_put()), with the release a dying cgroup or an offline css waits
for.  A live cgroup pins itself, each css of its own, each child cgroup not yet released, and
each charge its css; the dying and offline ones are counted in their ancestors until released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cgroup import Cgroup
    from .css import Css


def css_put(css: Css) -> None:
    """Drop a pin on a css (a charge or a child css going, or the css going offline)."""
    _drop_pin(css.cgroup, css)


def cgroup_put(cg: Cgroup) -> None:
    """Drop a pin on a cgroup (a child cgroup released, or the cgroup removed)."""
    _drop_pin(cg, None)


def _drop_pin(cg: Cgroup, css: Css | None) -> None:
    """Drop a pin on `css`, or on `cg` when there is no css, and release what that leaves
    unpinned: an offline css with no pins drops its pins on its parent css and its cgroup, a
    dying cgroup with none its pin on its parent.  Everything released lies on the path to the
    root, so one loop up that path releases it and settles every ancestor's counters, however
    deep the chain (no recursion, and no walk per released level)."""
    released_csses = [0] * len(cg.nr_dying_subsys)  # by ssid: released at or below this level
    released_cgroups = 0  # released strictly below this level
    cgroup_pins = 0 if css is not None else 1  # pins this level's cgroup loses
    node: Cgroup | None = cg
    while node is not None and (css is not None or cgroup_pins):
        parent_css = None  # the css of the next level up that loses a pin
        if css is not None:
            css.refs -= 1
            if css.refs == 0:
                released_csses[css.ssid] += 1
                cgroup_pins += 1
                parent_css = css.parent
        node.nr_dying_descendants -= released_cgroups
        for ssid, count in enumerate(released_csses):
            node.nr_dying_subsys[ssid] -= count
        parent_pins = 0
        if cgroup_pins:
            node.refs -= cgroup_pins
            if node.refs == 0:
                released_cgroups += 1
                parent_pins = 1
                if node.made_by is not None:
                    budget, creator = node.made_by
                    budget.give(creator)
        node, css, cgroup_pins = node.parent, parent_css, parent_pins
    # Above the last level that lost a pin, only the counters change.
    dying_subsys = [(ssid, count) for ssid, count in enumerate(released_csses) if count]
    if not released_cgroups and not dying_subsys:
        return
    while node is not None:
        node.nr_dying_descendants -= released_cgroups
        for ssid, count in dying_subsys:
            node.nr_dying_subsys[ssid] -= count
        node = node.parent
