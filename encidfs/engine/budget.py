"""What each user may make the daemon hold.

The kernel charges what a user makes it keep (cgroups, kernfs xattrs, socket buffers) to her
memory cgroup: one tenant's excess is hers alone.  The daemon keeps all of it in one memory, so
each resource the outside can make it spend has a Budget: a total; for each user other than
the mount's owner and root, a share of it (a quarter, unless --user-share says otherwise);
and for those users together, all of it but a reserve (an eighth), which is the owner's.  One
user at her share leaves the others served, and the owner can always act.

It lives in the engine, the lowest layer that bounds something (the cgroups a user makes);
kernfs's xattrs, the kernel files opened --over DIR and the control socket's connections and
replies take their budgets from here too.
"""

from __future__ import annotations

import collections

RESERVE = 0.125  # of a budget, what the users other than the owners may not take


class Budget:
    def __init__(self, what: str, total: int, error: int, owners: frozenset[int],
                 share: float, most: int | None = None) -> None:
        """`what` names the units in refusals ("cgroups"); `error` is a refusal's errno;
        `share` is the fraction of `total` one user other than `owners` may hold (and `most`
        the most she may, whatever the share)."""
        self.what = what
        self.total = total
        self.error = error
        self.owners = owners
        self.per_user = max(1, int(total * share))
        if most is not None:
            self.per_user = min(self.per_user, most)
        self.for_users = total - int(total * RESERVE)
        self.held: collections.Counter[int] = collections.Counter()  # by uid
        self.in_all = 0
        self.by_users = 0  # held by users other than the owners

    def check(self, uid: int, amount: int = 1) -> None:
        """OSError (the budget's errno, naming it) if `uid` may not take `amount` more."""
        if self.in_all + amount > self.total:
            raise OSError(self.error, f"all {self.total} {self.what} are taken")
        if uid in self.owners:
            return
        if self.held[uid] + amount > self.per_user:
            raise OSError(self.error, f"user {uid} holds her share of {self.what} "
                                      f"({self.per_user})")
        if self.by_users + amount > self.for_users:
            raise OSError(self.error, f"users hold all {self.what} but the mount owner's "
                                      f"reserve ({self.total - self.for_users})")

    def take(self, uid: int, amount: int = 1) -> None:
        """What check() allowed, held; also what is restored, which is not checked."""
        self.held[uid] += amount
        self.in_all += amount
        if uid not in self.owners:
            self.by_users += amount

    def give(self, uid: int, amount: int = 1) -> None:
        self.held[uid] -= amount
        if not self.held[uid]:
            del self.held[uid]
        self.in_all -= amount
        if uid not in self.owners:
            self.by_users -= amount
