"""Extended attributes of kernfs nodes, kept in memory as kernfs keeps them (simple_xattrs),
with kernfs's limits per node, and charged to whoever set each.

Nodes are inode numbers here: which node a request or a snapshot names, and the root's
read-only attributes, are the Kernfs's to know.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from ..engine import fail
from ..engine.budget import Budget
from ..engine.events import Commit

XATTRS_MAX = 128  # kernfs's limits on user xattrs per node
XATTR_BYTES_MAX = 128 * 1024
# All nodes together (bytes of names and values, and names): kernfs charges xattrs to the
# writer's memory cgroup, the daemon has only its own memory to spend (some 150 bytes a name).
XATTR_TOTAL_MAX = 64 << 20
XATTR_NAMES_TOTAL_MAX = 1 << 18


class Xattrs:
    def __init__(self, owner: int, owners: frozenset[int], share: float) -> None:
        """`owner` is charged for what was set before setters were kept; the budgets are shared
        out to the users: `share` to each but `owners`."""
        self.owner = owner
        self._values: dict[int, dict[bytes, bytes]] = {}  # by inode; only nodes that have some
        # Who set each xattr, charged its name and value's bytes and one name in the budgets.
        self._setters: dict[tuple[int, bytes], int] = {}
        self.byte_budget = Budget("bytes of extended attributes", XATTR_TOTAL_MAX,
                                  errno.ENOSPC, owners, share)
        self.name_budget = Budget("extended attributes", XATTR_NAMES_TOTAL_MAX, errno.ENOSPC,
                                  owners, share)

    def of(self, inode: int) -> dict[bytes, bytes]:
        """The node's xattrs, to read."""
        return self._values.get(inode, {})

    def set(self, inode: int, name: bytes, value: bytes, uid: int | None,
            commit: Commit) -> None:
        """`uid`: who sets it (None: the owner).  ENOSPC past kernfs's limits for the node or
        past the setter's share."""
        xattrs = self._values.get(inode, {})
        old = xattrs.get(name)
        size = sum(len(v) for k, v in xattrs.items() if k != name) + len(value)
        if (old is None and len(xattrs) >= XATTRS_MAX) or size > XATTR_BYTES_MAX:
            raise fail(errno.ENOSPC)
        setter = self.owner if uid is None else uid
        # A value replaced gives back what it took first: the new one may take that room.
        old_setter = None if old is None else self._uncharge(inode, name, old)
        try:
            self.byte_budget.check(setter, len(name) + len(value))
            self.name_budget.check(setter)
            commit()
        except OSError:
            if old is not None and old_setter is not None:
                self._charge(inode, name, old, old_setter)
            raise
        self._values.setdefault(inode, xattrs)[name] = value
        self._charge(inode, name, value, setter)

    def remove(self, inode: int, name: bytes, commit: Commit) -> None:
        xattrs = self._values.get(inode, {})
        if name not in xattrs:
            raise fail(errno.ENODATA)
        commit()
        self._uncharge(inode, name, xattrs.pop(name))
        if not xattrs:
            del self._values[inode]

    def forget(self, inodes: Iterable[int]) -> None:
        """The nodes are gone, and their xattrs with them."""
        if self._values:  # most nodes have none: an empty table is not searched (rmdir's cost)
            for inode in inodes:
                for name, value in self._values.pop(inode, {}).items():
                    self._uncharge(inode, name, value)

    def _charge(self, inode: int, name: bytes, value: bytes, uid: int) -> None:
        self.byte_budget.take(uid, len(name) + len(value))
        self.name_budget.take(uid)
        self._setters[inode, name] = uid

    def _uncharge(self, inode: int, name: bytes, value: bytes) -> int:
        """Give back what setting xattr `name` to `value` took; who had set it."""
        uid = self._setters.pop((inode, name))
        self.byte_budget.give(uid, len(name) + len(value))
        self.name_budget.give(uid)
        return uid

    # -- snapshots ----------------------------------------------------------------------------

    def dump(self, entry: Callable[[int], tuple[dict, str]]) -> None:
        """Each node's xattrs and who set them, into `entry(inode)`: the snapshot entry of its
        cgroup (which has "xattrs") and its file name ("" for the directory)."""
        for inode, xattrs in self._values.items():
            node, name = entry(inode)
            node["xattrs"][name] = {as_text(k): as_text(v) for k, v in xattrs.items()}
            node.setdefault("xattr_setters", {})[name] = {
                as_text(k): self._setters[inode, k] for k in xattrs}

    def load(self, entry: dict, inode_of: Callable[[str], int | None]) -> None:
        """What dump() wrote into a cgroup's `entry`; `inode_of` a file name's node, None for a
        file this mount lacks (its xattrs go with it)."""
        setters = entry.get("xattr_setters", {})
        for name, xattrs in entry["xattrs"].items():
            inode = inode_of(name)
            if inode is None:
                continue
            # Charged to whoever set each (a snapshot from before setters were kept: the owner).
            who = setters.get(name, {})
            self._values[inode] = {as_bytes(k): as_bytes(v) for k, v in xattrs.items()}
            for key, value in xattrs.items():
                self._charge(inode, as_bytes(key), as_bytes(value), who.get(key, self.owner))


# xattr names and values are bytes; records and snapshots carry them as Latin-1 text (one
# character a byte), which JSON keeps exactly.
def as_text(data: bytes) -> str:
    return data.decode("latin-1")


def as_bytes(text: str) -> bytes:
    return text.encode("latin-1")
