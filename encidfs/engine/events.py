"""The engine's two ways out.  A change calls its commit point (`Commit`) once its checks
have passed and before it changes anything: the journal makes the change durable there.  What
changed is told to the layers above as events, (TreeEvent or a file's notification key,
cgroup), on the hierarchy's bus (`Hierarchy.events`), which the daemon drains.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cgroup import Cgroup

Commit = Callable[[], None]


def no_journal() -> None:
    """The commit of an engine kept only in memory (and of a change being replayed)."""


class TreeEvent(Enum):
    """What the engine tells the layers above, as (TreeEvent, cgroup) on its event bus; besides
    these, (file key, cgroup) notifies the file that a file table row declares with that key
    (the kernel's cgroup_file_notify())."""

    FILES = "files"  # the set of interface files of a cgroup changed
    REMOVED = "removed"  # the cgroup was removed (it may still be dying)


CGROUP_EVENTS_KEY = "cgroup.events"  # notifies cgroup.events: populated or frozen changed
Event = tuple["TreeEvent | str", "Cgroup"]
