"""The accounting engine: the cgroup tree, the core rules, the controllers and the allocator.
No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .allocator import Allocation, Allocator
from .budget import Budget
from .cgroup import INT_MAX, Cgroup, Hierarchy
from .css import Controller
from .encids import EncidsController
from .errors import ChargeRefused, RangeFull, Refused, fail
from .events import CGROUP_EVENTS_KEY, TreeEvent
from .kernel import KernelInterface
from .membership import Membership
from .misc import MiscController
from .resource import U64_MAX, Charge, ResourceController, Types

__all__ = [
    "CGROUP_EVENTS_KEY", "INT_MAX", "U64_MAX", "Allocation", "Allocator", "Cgroup", "Charge",
    "ChargeRefused", "Controller", "EncidsController", "Engine", "Hierarchy", "KernelInterface",
    "Membership", "MiscController", "RangeFull", "Refused", "ResourceController", "TreeEvent",
    "Types", "fail", "new_engine",
]


@dataclass
class Engine:
    hierarchy: Hierarchy
    types: Types
    allocator: Allocator


def new_engine(capacities: dict[str, int], first_ids: dict[str, int] | None = None,
               controllers: tuple[type[Controller], ...] = (EncidsController,),
               max_cgroups: int = INT_MAX, budget: Budget | None = None,
               kernel: KernelInterface = KernelInterface(),
               snp_asids: int | None = 0,
               membership: Callable[[Hierarchy], Membership] | None = None) -> Engine:
    """A hierarchy with these controllers (in this order) for the given resource types, and the
    allocator that charges them; `budget` shares the cgroups out to their creators; `kernel`
    is the kernel whose interface misc shows; `snp_asids`, the SNP guests' own IDs (see
    Allocator); `membership`, what keeps where processes are, made for the hierarchy, if not
    its own books (see Hierarchy)."""
    types = Types(capacities, first_ids)
    hierarchy = Hierarchy([controller(types, kernel) for controller in controllers],
                          max_cgroups, membership=membership, budget=budget)
    return Engine(hierarchy, types, Allocator(hierarchy, types, snp_asids))
