"""Reading a state file of schema 1 (encidfs 0.1), to upgrade it in place.

Schema 1 kept the state itself in tables, by path: cgroups (settings and encids limits), nodes
(modes and owners; "" the directory, "*" the files' defaults), xattrs, members and allocations
(each with its process's start time; "dying" for a cgroup removed while charged).  It is read
here into the engine through the same changes a journal replays, then written in this
release's schema.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable

from ..engine import Cgroup
from .changes import Changes

log = logging.getLogger(__name__)


def restore(db: sqlite3.Connection, changes: Changes,
            start_time: Callable[[int], int | None]) -> None:
    h = changes.hierarchy
    nodes: dict[str, dict[str, tuple[int, int, int]]] = defaultdict(dict)
    for path, file, mode, uid, gid in db.execute("SELECT path, file, mode, uid, gid FROM nodes"):
        nodes[path][file] = (mode, uid, gid)
    rows = db.execute("SELECT path, subtree_control, max_depth, max_descendants, freeze, "
                      "encids_max FROM cgroups").fetchall()
    rows.sort(key=lambda row: 0 if row[0] == "/" else row[0].count("/"))
    # The tree first, its limits last: they may be lower than what they must let through.
    cgroups = {"/": h.root}
    for path, *_ in rows[1:]:
        parent, name = path.rsplit("/", 1)
        cgroups[path] = _mkdir(changes, cgroups[parent or "/"], name, nodes.get(path, {}))
    for path, subtree_control, *_ in rows:
        changes.subtree_control(cgroups[path].id, subtree_control.split(), [], 0, 0)
    for path, files in nodes.items():
        for file, (mode, uid, gid) in files.items():
            if path in cgroups and file != "*":
                _quietly(changes.setattr, cgroups[path].id, file, mode, uid, gid)
    for path, file, name, value in db.execute("SELECT path, file, name, value FROM xattrs"):
        if path in cgroups:
            _quietly(changes.setxattr, cgroups[path].id, file, bytes(name).decode("latin-1"),
                     bytes(value).decode("latin-1"))

    held: dict[tuple[int, int, str, str, int], list[int]] = defaultdict(list)
    for id_, type_name, holder, start, path, dying in db.execute(
            "SELECT id, type, holder, start, path, dying FROM allocations ORDER BY id"):
        if start_time(holder) == start:
            held[(holder, start, type_name, path, dying)].append(id_)
    stand_ins: dict[str, Cgroup] = {}
    for (holder, start, type_name, path, dying), ids in held.items():
        cg = cgroups.get(path) if not dying else None
        if type_name in changes.engine.types.names:
            changes.allocator.adopt(holder, type_name, ids,
                                    cg or _stand_in(changes, cgroups, stand_ins, path))
            changes.starts[holder] = start
    for cg in sorted(stand_ins.values(), key=lambda cg: -cg.level):
        changes.rmdir(cg.id)  # dying again, until its charges go

    for path, _, max_depth, max_descendants, freeze, limits in rows:
        cg = cgroups[path]
        changes.set(cg.id, "max_depth", max_depth)
        changes.set(cg.id, "max_descendants", max_descendants)
        changes.set(cg.id, "freeze", freeze)
        if limits is not None and not cg.is_root:
            for type_name, value in json.loads(limits).items():
                # Schema 1 kept limits of cgroups whose controller was disabled since.
                _quietly(changes.controller_setting, cg.id, "encids", type_name, value)
    for pid, start, path in db.execute("SELECT pid, start, path FROM members"):
        if start_time(pid) == start and path in cgroups:
            changes.attach(pid, start, cgroups[path].id)


def _mkdir(changes: Changes, parent: Cgroup, name: str,
           files: dict[str, tuple[int, int, int]]) -> Cgroup:
    mode = files.get("", (0o40755, 0, 0))[0] & 0o7777
    _, uid, gid = files.get("*", files.get("", (0, 0, 0)))
    return changes.mkdir(parent.id, name, mode, uid, gid)


def _stand_in(changes: Changes, cgroups: dict[str, Cgroup], stand_ins: dict[str, Cgroup],
              path: str) -> Cgroup:
    """A cgroup removed while charged stays dying until its charges go: make one to stand in
    for it (and for its removed ancestors), to be removed again once charged.  Dying cgroups
    have no name, so a stand-in's is never seen."""
    missing = []
    while path not in stand_ins and path not in cgroups:
        missing.append(path)
        path = path.rsplit("/", 1)[0] or "/"
    parent = stand_ins.get(path) or cgroups[path]
    for path in reversed(missing):
        name = path.rsplit("/", 1)[1]
        if name in parent.children:
            name = f"{name}.removed-{len(stand_ins)}"
        parent = stand_ins[path] = _mkdir(changes, parent, name, {})
    return parent


def _quietly(change: Callable[..., None], *args: object) -> None:
    try:
        change(*args)
    except (OSError, LookupError) as error:
        log.warning("schema 1 state: %s%r left out: %s", change.__name__, args, error)
