"""The event bus: the engine appends what changed to its hierarchy; the daemon drains it once
per request or process event and hands the batch to each consumer.  No consumer drains it on
another's behalf."""

from __future__ import annotations

from collections.abc import Callable

from ..engine import Hierarchy
from ..engine.events import Event


class EventBus:
    """The engine's events, handed once per request or event, as one batch, to each of its
    consumers (the FUSE adapter, for kernfs's invalidation and poll; the inotify notifier)."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.consumers: list[Callable[[list[Event]], None]] = []

    def pending(self) -> bool:
        return bool(self.hierarchy.events)

    def deliver(self) -> None:
        batch = self.hierarchy.drain_events()
        if batch:
            for consume in self.consumers:
                consume(batch)
