"""The misc controller, as upstream merged it (kernel/cgroup/misc.c): misc.max, misc.current,
misc.peak, misc.events and misc.events.local, and misc.capacity at the root.

A refusal counts in events.local at the refusing level, and in events at the refusing level
and each of its ancestors below the root (misc_cg_event()).  An older kernel's interface
(engine/kernel.py) counts only what that kernel had files for, and lacks the types it did
not name.
"""

from __future__ import annotations

import errno

from .errors import fail
from .kernel import TYPES_SINCE, KernelInterface
from .resource import ResourceController, ResourceCss, Types

MISC_EVENTS_KEY = "misc.events"
MISC_EVENTS_LOCAL_KEY = "misc.events.local"


class MiscController(ResourceController):
    name = "misc"

    def __init__(self, types: Types, kernel: KernelInterface = KernelInterface()) -> None:
        super().__init__(types, kernel)
        # The host's types this kernel's misc.c does not name: no file shows them, no limit
        # takes them, and a charge of one is refused.
        self.unknown = frozenset(t for t, name in enumerate(types.names)
                                 if not kernel.has_type(name))

    def refusing_level(self, css: ResourceCss, t: int, amount: int) -> ResourceCss | None:
        # KVM of such a kernel has no such guests to charge: a type misc_cg_try_charge()
        # does not know is EINVAL.
        if t in self.unknown:
            name = self.types.names[t]
            major, minor = TYPES_SINCE[name]
            raise fail(errno.EINVAL, f"misc has no resource type {name} before Linux "
                                     f"{major}.{minor}")
        return super().refusing_level(css, t, amount)

    def count_refusal(self, refusing: ResourceCss, t: int) -> None:
        if self.kernel.misc_events_local:
            refusing.events_local[t] += 1
            self._notify(refusing.cgroup, MISC_EVENTS_LOCAL_KEY)
        if not self.kernel.misc_events:
            return
        for level in refusing.ancestors():
            if level.parent is None:
                break
            level.events[t] += 1
            self._notify(level.cgroup, MISC_EVENTS_KEY)
