"""The Encryption IDs controller, as the "cgroup: svm: Add Encryption ID controller" proposal
defines it: encids.<type>.max, .current and .events in each cgroup, .stat at the root.

It counts a refusal at the refusing level and at each of its ancestors, and notifies the
refused type's events file there.
"""

from __future__ import annotations

from .resource import ResourceController, ResourceCss


class EncidsController(ResourceController):
    name = "encids"

    def count_refusal(self, refusing: ResourceCss, t: int) -> None:
        key = events_file(self.types.names[t])
        for level in refusing.ancestors():
            level.events[t] += 1
            self._notify(level.cgroup, key)


def events_file(type_name: str) -> str:
    return f"encids.{type_name}.events"
