"""The accounting engine: the cgroup tree, the core rules and the controllers. No I/O."""

from .cgroup import INT_MAX, Cgroup, Change, Hierarchy
from .encids import U64_MAX, Charge, EncidsController
from .errors import ChargeRefused, fail

__all__ = [
    "INT_MAX", "U64_MAX", "Cgroup", "Change", "Charge", "ChargeRefused", "EncidsController",
    "Hierarchy", "fail", "new_hierarchy",
]


def new_hierarchy(capacities: dict[str, int], first_ids: dict[str, int] | None = None,
                  max_cgroups: int = INT_MAX) -> Hierarchy:
    """A hierarchy with the encids controller for the given types."""
    return Hierarchy([EncidsController(capacities, first_ids)], max_cgroups)
