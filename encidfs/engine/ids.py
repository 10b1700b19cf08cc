"""Encryption ID numbers: each type owns a range, and hands out its lowest free ID first."""

from __future__ import annotations

import heapq


class IdSpace:
    """The IDs of one type.  Memory grows with the IDs ever used, not with the range."""

    __slots__ = ("ids", "_next", "_freed")

    def __init__(self, ids: range) -> None:
        self.ids = ids
        self._next = ids.start  # IDs from here on have never been handed out
        self._freed: list[int] = []  # a heap of IDs below _next that are free again

    def take(self, count: int) -> list[int]:
        """The `count` lowest free IDs; the caller has checked that there are that many."""
        taken = []
        for _ in range(count):
            if self._freed:
                taken.append(heapq.heappop(self._freed))
            else:
                taken.append(self._next)
                self._next += 1
        assert taken[-1] in self.ids
        return taken

    def available(self) -> int:
        """How many IDs are free."""
        return self.ids.stop - self._next + len(self._freed)

    def claim(self, id_: int) -> None:
        """Mark one particular free ID as taken (restoring what a holder had)."""
        if id_ >= self._next:
            self._freed.extend(range(self._next, id_))
            self._next = id_ + 1
        else:
            self._freed.remove(id_)
        heapq.heapify(self._freed)

    def give_back(self, id_: int) -> None:
        heapq.heappush(self._freed, id_)
