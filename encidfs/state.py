"""Durable state in SQLite: what a restarted daemon needs to carry on where it stopped.

The journal writes each request's changes in one transaction before the request is answered:
the tree and its settings, node attributes, memberships and allocations (with the start time of
each process, so that a PID reused while the daemon was down is not mistaken for its holder).
On start, `restore` rebuilds all of it and drops the processes that are gone.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable

from .engine import Cgroup, Change, EncidsController, Hierarchy
from .files.cftype import Caller
from .files.table import FileTable, NodeAttr, NodeState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cgroups (path TEXT PRIMARY KEY, subtree_control TEXT NOT NULL,
                      max_depth INTEGER NOT NULL, max_descendants INTEGER NOT NULL,
                      freeze INTEGER NOT NULL, encids_max TEXT);
CREATE TABLE nodes (path TEXT NOT NULL, file TEXT NOT NULL, mode INTEGER NOT NULL,
                    uid INTEGER NOT NULL, gid INTEGER NOT NULL, PRIMARY KEY (path, file));
CREATE TABLE xattrs (path TEXT NOT NULL, file TEXT NOT NULL, name BLOB NOT NULL,
                     value BLOB NOT NULL, PRIMARY KEY (path, file, name));
CREATE TABLE members (pid INTEGER PRIMARY KEY, start INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE allocations (id INTEGER PRIMARY KEY, type TEXT NOT NULL, holder INTEGER NOT NULL,
                          start INTEGER NOT NULL, path TEXT NOT NULL, dying INTEGER NOT NULL);
"""


class StateError(Exception):
    """A state file that cannot be used; the message is for the user."""


def open_state(path: str, layout: dict) -> sqlite3.Connection:
    """Open (or create) a state file made for this ID layout; refuse anything else."""
    existed = os.path.exists(path) and os.path.getsize(path) > 0
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if existed:
            _check(db, path, layout)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        if not existed:
            with db:
                db.execute("BEGIN")
                for statement in _SCHEMA.split(";")[:-1]:
                    db.execute(statement)
                db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("application", "encidfs"), ("schema", str(SCHEMA_VERSION)),
                    ("layout", json.dumps(layout, sort_keys=True))])
    except sqlite3.DatabaseError as error:
        raise StateError(f"{path} is not a usable encidfs state file ({error})") from None
    return db


def _check(db: sqlite3.Connection, path: str, layout: dict) -> None:
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as error:
        raise StateError(f"{path} is not an encidfs state file ({error}); "
                         "it is left as it is") from None
    if meta.get("application") != "encidfs":
        raise StateError(f"{path} is not an encidfs state file; it is left as it is")
    if meta.get("schema") != str(SCHEMA_VERSION):
        raise StateError(f"{path} has state format {meta.get('schema')}, this encidfs reads "
                         f"{SCHEMA_VERSION}; it is left as it is")
    if json.loads(meta.get("layout", "null")) != json.loads(json.dumps(layout, sort_keys=True)):
        raise StateError(f"{path} was made for other resource types or capacities "
                         f"({meta.get('layout')}); mount with those, or use another file")


class StateJournal:
    """Writes the engine's changes, as the file table drains them, to the state file."""

    def __init__(self, db: sqlite3.Connection, hierarchy: Hierarchy, table: FileTable,
                 start_time: Callable[[int], int | None]) -> None:
        self.db = db
        self.hierarchy = hierarchy
        self.table = table
        self.encids: EncidsController = hierarchy.controller("encids")  # type: ignore[assignment]
        self._start_time = start_time
        self._stored_ids: set[int] = set()

    def record(self, changes: list[tuple[Change, Cgroup]], nodes: set[Cgroup]) -> None:
        settings = {cg for change, cg in changes if change is Change.SETTINGS}
        procs = {cg for change, cg in changes if change is Change.PROCS}
        removed = [cg for change, cg in changes if change is Change.REMOVED]
        allocations = any(change is Change.ALLOCATIONS for change, _ in changes)
        if not (settings or procs or removed or allocations or nodes):
            return
        with self.db:
            self.db.execute("BEGIN")
            for cg in removed:
                self._remove(cg)
            for cg in settings - set(removed):
                self._save_settings(cg)
            for cg in nodes - set(removed):
                self._save_nodes(cg)
            for cg in procs - set(removed):
                self._save_procs(cg)
            if allocations or removed:
                self._save_allocations(removed)

    def save_all(self) -> None:
        """Write the whole state anew (after a restore dropped what is gone)."""
        with self.db:
            self.db.execute("BEGIN")
            for table in ("cgroups", "nodes", "xattrs", "members", "allocations"):
                self.db.execute(f"DELETE FROM {table}")  # noqa: S608 (fixed names)
            self._stored_ids = set()
            for cg in self.hierarchy.subtree(self.hierarchy.root):
                self._save_settings(cg)
                self._save_nodes(cg)
                self._save_procs(cg)
            self._save_allocations([])

    # -- rows ---------------------------------------------------------------------------------

    def _save_settings(self, cg: Cgroup) -> None:
        css = cg.css[self.encids.ssid]
        limits = None if css is None else json.dumps(dict(zip(self.encids.types,
                                                              css.max)))  # type: ignore[attr-defined]
        self.db.execute("INSERT OR REPLACE INTO cgroups VALUES (?, ?, ?, ?, ?, ?)", (
            cg.path, " ".join(self.hierarchy.names(cg.subtree_control)), cg.max_depth,
            cg.max_descendants, int(cg.freeze), limits))

    def _save_nodes(self, cg: Cgroup) -> None:
        path = cg.path
        state = self.table.node_state(cg)
        self.db.execute("DELETE FROM nodes WHERE path = ?", (path,))
        self.db.execute("DELETE FROM xattrs WHERE path = ?", (path,))
        self.db.executemany("INSERT INTO nodes VALUES (?, ?, ?, ?, ?)", [
            (path, name, attr.mode, attr.uid, attr.gid) for name, attr in state.attrs.items()])
        self.db.executemany("INSERT INTO xattrs VALUES (?, ?, ?, ?)", [
            (path, file, name, value) for file, values in state.xattrs.items()
            for name, value in values.items()])

    def _save_procs(self, cg: Cgroup) -> None:
        if cg.dying or cg.is_root:
            return
        path = cg.path
        self.db.execute("DELETE FROM members WHERE path = ?", (path,))
        rows = [(pid, start, path) for pid in cg.procs or ()
                if (start := self._start_time(pid)) is not None]
        self.db.executemany("INSERT OR REPLACE INTO members VALUES (?, ?, ?)", rows)

    def _remove(self, cg: Cgroup) -> None:
        path = cg.path
        for table in ("cgroups", "nodes", "xattrs", "members"):
            self.db.execute(f"DELETE FROM {table} WHERE path = ?", (path,))  # noqa: S608

    def _save_allocations(self, removed: list[Cgroup]) -> None:
        current = self.encids.allocations()
        gone = self._stored_ids - current.keys()
        self.db.executemany("DELETE FROM allocations WHERE id = ?", [(i,) for i in gone])
        new = [(id_, self.encids.types[charge.type], holder, start, charge.cgroup.path,
                int(charge.cgroup.dying))
               for id_, (holder, charge) in current.items() if id_ not in self._stored_ids
               if (start := self._start_time(holder)) is not None]
        self.db.executemany("INSERT OR REPLACE INTO allocations VALUES (?, ?, ?, ?, ?, ?)", new)
        # Charges of a cgroup removed since they were made now belong to a dying cgroup.
        self.db.executemany("UPDATE allocations SET dying = 1 WHERE path = ?",
                            [(cg.path,) for cg in removed])
        self._stored_ids = (self._stored_ids - gone) | {row[0] for row in new}


def restore(db: sqlite3.Connection, hierarchy: Hierarchy, table: FileTable,
            start_time: Callable[[int], int | None]) -> list[int]:
    """Rebuild the tree, attributes, live memberships and live allocations; return the PIDs
    that must be watched (members and holders)."""
    encids: EncidsController = hierarchy.controller("encids")  # type: ignore[assignment]
    nodes = _node_states(db)
    rows = db.execute("SELECT path, subtree_control, max_depth, max_descendants, freeze, "
                      "encids_max FROM cgroups").fetchall()
    rows.sort(key=lambda row: 0 if row[0] == "/" else row[0].count("/"))
    # The tree first, its limits last: they may be lower than what they must let through.
    cgroups = {"/": hierarchy.root}
    for path, *_ in rows[1:]:
        parent, name = path.rsplit("/", 1)
        cgroups[path] = _mkdir(table, cgroups[parent or "/"], name, nodes.get(path))
    for path, state in nodes.items():
        if path in cgroups:
            table.restore_node_state(cgroups[path], state)
    for path, subtree_control, *_ in rows:
        names = subtree_control.split()
        mask = sum(1 << c.ssid for c in hierarchy.controllers if c.name in names)
        hierarchy.write_subtree_control(cgroups[path], mask, 0)

    def alive(pid: int, start: int) -> bool:
        return start_time(pid) == start

    watched = []
    held: dict[tuple[int, str, str, int], list[int]] = defaultdict(list)
    for id_, type_name, holder, start, path, dying in db.execute(
            "SELECT id, type, holder, start, path, dying FROM allocations ORDER BY id"):
        if alive(holder, start) and type_name in encids.types:
            held[(holder, type_name, path, dying)].append(id_)
    stand_ins: dict[str, Cgroup] = {}
    for (holder, type_name, path, dying), ids in held.items():
        cg = cgroups.get(path) if not dying else None
        encids.adopt(holder, type_name, ids, cg or _stand_in(table, cgroups, stand_ins, path))
        watched.append(holder)
    for cg in sorted(stand_ins.values(), key=lambda cg: -cg.level):
        hierarchy.rmdir(cg)  # dying again, until its charges go

    for path, _, max_depth, max_descendants, freeze, limits in rows:
        cg = cgroups[path]
        hierarchy.set_max_depth(cg, max_depth)
        hierarchy.set_max_descendants(cg, max_descendants)
        hierarchy.set_freeze(cg, bool(freeze))
        if limits is not None and not cg.is_root:
            for type_name, value in json.loads(limits).items():
                if type_name in encids.types:
                    encids.set_max(cg, encids.type_index(type_name), value)
    for pid, start, path in db.execute("SELECT pid, start, path FROM members"):
        if alive(pid, start) and path in cgroups:
            hierarchy.attach(pid, cgroups[path])
            watched.append(pid)
    return sorted(set(watched))


def _mkdir(table: FileTable, parent: Cgroup, name: str, state: NodeState | None) -> Cgroup:
    attr = state.attrs.get("") if state else None
    owner = Caller(0, attr.uid, attr.gid) if attr else Caller(0, 0, 0)
    return table.mkdir(table.dir_inode(parent), os.fsencode(name),
                       attr.mode if attr else 0o755, owner).cgroup


def _stand_in(table: FileTable, cgroups: dict[str, Cgroup], stand_ins: dict[str, Cgroup],
              path: str) -> Cgroup:
    """A cgroup removed while charged stays dying until its charges go: make one to stand in
    for it (and for its removed ancestors), to be removed again once charged.  Dying cgroups
    have no name, so a stand-in's is never seen."""
    if path in stand_ins:
        return stand_ins[path]
    parent_path, name = path.rsplit("/", 1)
    parent_path = parent_path or "/"
    parent = stand_ins.get(parent_path) or cgroups.get(parent_path)
    if parent is None:
        parent = _stand_in(table, cgroups, stand_ins, parent_path)
    if name in parent.children:
        name = f"{name}.removed-{len(stand_ins)}"
    stand_ins[path] = _mkdir(table, parent, name, None)
    return stand_ins[path]


def _node_states(db: sqlite3.Connection) -> dict[str, NodeState]:
    states: dict[str, NodeState] = defaultdict(lambda: NodeState({}, {}))
    now = time.time_ns()
    for path, file, mode, uid, gid in db.execute("SELECT path, file, mode, uid, gid FROM nodes"):
        states[path].attrs[file] = NodeAttr(mode, uid, gid, now, now)
    for path, file, name, value in db.execute("SELECT path, file, name, value FROM xattrs"):
        states[path].xattrs.setdefault(file, {})[bytes(name)] = bytes(value)
    return states
