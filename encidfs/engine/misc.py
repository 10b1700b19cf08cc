"""The misc controller, as upstream merged it (kernel/cgroup/misc.c): misc.max, misc.current,
misc.peak, misc.events and misc.events.local, and misc.capacity at the root.

A refusal counts in events.local at the refusing level, and in events at the refusing level
and each of its ancestors below the root (misc_cg_event()).
"""

from __future__ import annotations

from .resource import ResourceController, ResourceCss

EVENTS_FILE = "misc.events"
EVENTS_LOCAL_FILE = "misc.events.local"


class MiscController(ResourceController):
    name = "misc"

    def count_refusal(self, refusing: ResourceCss, t: int) -> None:
        refusing.events_local[t] += 1
        self._notify(refusing.cgroup, EVENTS_LOCAL_FILE)
        for level in refusing.ancestors():
            if level.parent is None:
                break
            level.events[t] += 1  # type: ignore[attr-defined]
            self._notify(level.cgroup, EVENTS_FILE)
