"""The state file: a SQLite write-ahead journal of changes, and checkpoints that compact it.

    meta      application, schema, layout (what IDs there are), boot (runtime files only)
    snapshot  one row: the whole state as JSON (engine, nodes, start times), or none yet
    log       the records made since the snapshot, in order

A record is committed before its change is applied (see changes.py); a failure to commit is
an error for the request (ENOSPC for a full disk, EIO otherwise) and the change does not
happen.  Facts (forks, exits) wait in memory and go in with the next record or flush.  When a
write failed, or the file was damaged behind the daemon's back (its -wal file deleted or
truncated, the file replaced), the next write first writes the whole state anew from memory,
into a fresh file put in place by rename(2); until that works (it is tried again every
second), every change is refused.

The file and its -wal are 0600; a lock file beside it (FILE.lock, flock) keeps a second daemon
out for as long as the first runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable

from ..runtime import runtime_path
from .changes import Record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: encids only, charges per controller; 3: allocations across controllers
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL);
CREATE TABLE log (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""
CHECKPOINT_MIN = 10_000  # records; more when the state is larger (see _due)
RETRY_INTERVAL = 1.0  # seconds between tries to write a file that failed
_SQLITE_FULL = 13


class StateError(Exception):
    """A state file that cannot be used; the message is for the user."""


def runtime_state_path(mountpoint: str) -> str:
    """Where a mount without --state keeps its runtime file."""
    return runtime_path(mountpoint, "state", ".db")


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


class StateStore:
    def __init__(self, path: str, layout: dict, durable: bool, runtime: bool = False) -> None:
        """`durable`: every commit is on disk before it returns (synchronous=FULL); without,
        it survives the daemon's death but not the machine's (a runtime file on /run).
        `runtime`: a file left from another boot is started afresh, as a reboot would."""
        self.path = path
        self.layout = json.loads(json.dumps(layout, sort_keys=True))
        self.durable = durable
        self.runtime = runtime
        self.snapshot: Callable[[], dict] = dict  # the state now, for checkpoints
        self.size: Callable[[], int] = lambda: 0  # how large a checkpoint would be
        self._pending: list[Record] = []
        self._log_rows = 0
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # of the file: device, inode
        self._wal: tuple[tuple[int, int], int] | None = None  # of the -wal, and its size
        self._failure: OSError | None = None  # of the last write, until one succeeds
        self._retry_at = 0.0
        self._lock = self._take_lock()

    # -- opening --------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        if os.path.islink(self.path):
            raise StateError(f"{self.path} is a symbolic link; give the file itself")
        lock_path = self.path + ".lock"
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | flags, 0o600)
        except OSError as error:
            try:  # a read-only file system: a lock all the same, for reading
                fd = os.open(lock_path, os.O_RDONLY | flags)
            except OSError:
                raise StateError(f"cannot open {lock_path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateError(f"{self.path} is in use by another encidfs daemon "
                             f"(pid {holder or 'unknown'})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # read-only: the PID is only for the message above
        return fd

    def open(self) -> tuple[dict | None, list[Record], sqlite3.Connection | None]:
        """Open (or create) the file; return its snapshot and records, and a connection to a
        file of schema 1 (to be upgraded by the caller), or None."""
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            db = self._connect_existing()
            meta = self._meta(db)
            if meta.get("schema") == "1":
                return None, [], db
            if self.runtime and meta.get("boot") != boot_id():
                log.info("%s is from another boot: starting afresh", self.path)
                db.close()
                self._remove_files()
            else:
                self._db = db
                self._set_pragmas()
                # An older snapshot is read as it is (restore.py upgrades it); the first
                # checkpoint writes it, and the schema, anew.
                snapshot, records = self._read()
                self._log_rows = len(records)
                self._remember_identity()
                _make_private(self.path)
                return snapshot, records, None
        self._create()
        return None, [], None

    def _connect_existing(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as error:
            raise StateError(f"{self.path} is not an encidfs state file ({error}); "
                             "it is left as it is") from None
        return db

    def _meta(self, db: sqlite3.Connection) -> dict[str, str]:
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as error:
            db.close()
            raise StateError(f"{self.path} is not an encidfs state file ({error}); "
                             "it is left as it is") from None
        problem = None
        if meta.get("application") != "encidfs":
            problem = f"{self.path} is not an encidfs state file; it is left as it is"
        elif meta.get("schema") not in ("1", "2", str(SCHEMA_VERSION)):
            problem = (f"{self.path} has state format {meta.get('schema')}, this encidfs reads "
                       f"1 to {SCHEMA_VERSION}; it is left as it is")
        elif json.loads(meta.get("layout", "null")) != self.layout:
            problem = (f"{self.path} was made for other resource types or capacities "
                       f"({meta.get('layout')}); mount with those, or use another file")
        if problem:
            db.close()
            raise StateError(problem)
        return meta

    def _read(self) -> tuple[dict | None, list[Record]]:
        assert self._db is not None
        try:
            row = self._db.execute("SELECT data FROM snapshot").fetchone()
            records = [tuple(json.loads(text)) for (text,) in
                       self._db.execute("SELECT record FROM log ORDER BY seq")]
        except (sqlite3.DatabaseError, ValueError) as error:
            raise StateError(f"{self.path} cannot be read ({error}); it is left as it is") \
                from None
        return (json.loads(row[0]) if row else None), records

    def _create(self) -> None:
        """A new, empty file, 0600."""
        self._remove_files()
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600))
        except OSError as error:
            raise StateError(f"cannot create {self.path}: {error.strerror}") from None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            self._set_pragmas()
            db.execute("BEGIN")
            self._write_schema(db, None)
            db.execute("COMMIT")
        except sqlite3.DatabaseError as error:
            raise StateError(f"cannot create {self.path}: {error}") from None
        self._remember_identity()

    def upgrade(self, db: sqlite3.Connection) -> None:
        """Replace a schema-1 file's tables by this schema's, with the state now in memory
        (restored from them), in one transaction: the file is upgraded in place."""
        self._db = db
        self._set_pragmas()
        tables = [name for (name,) in
                  db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        db.execute("BEGIN")
        for table in tables:
            db.execute(f'DROP TABLE "{table}"')  # names from the file's own schema
        self._write_schema(db, self.snapshot())
        db.execute("COMMIT")
        _make_private(self.path)
        self._remember_identity()

    def _write_schema(self, db: sqlite3.Connection, snapshot: dict | None) -> None:
        """The tables and the meta rows, and the snapshot if there is one (in the caller's
        transaction)."""
        meta = [("application", "encidfs"), ("schema", str(SCHEMA_VERSION)),
                ("layout", json.dumps(self.layout, sort_keys=True))]
        if self.runtime:
            meta.append(("boot", boot_id()))
        for statement in _SCHEMA.split(";")[:-1]:
            db.execute(statement)
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        if snapshot is not None:
            db.execute("INSERT INTO snapshot VALUES (1, ?)", (json.dumps(snapshot),))

    def _set_pragmas(self) -> None:
        assert self._db is not None
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # no -shm file; one writer
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as error:
            # Read-only: it can be read; the first write fails, and tries again later.
            log.warning("%s: %s", self.path, error)
        self._db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")

    # -- writing --------------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        self._write([*self._pending, record])

    def append_all(self, records: list[Record]) -> None:
        self._write([*self._pending, *records])

    def stage(self, record: Record) -> None:
        self._pending.append(record)

    def flush(self) -> None:
        """Commit the facts waiting; on failure they are in the next rewrite's snapshot."""
        if self._pending:
            try:
                self._write(list(self._pending))
            except OSError as error:
                log.warning("journal: facts not written (%s); the next write writes the "
                            "state anew", error.strerror)

    def checkpoint(self) -> None:
        """Compact the journal into a snapshot of the state now (at restore and at stop)."""
        self._write(list(self._pending), compact=True)

    def _write(self, records: list[Record], compact: bool = False) -> None:
        """Commit records, or raise OSError with the file as it was.  The first records are the
        facts waiting (applied already); the rest are changes not applied yet.  So a
        snapshot, taken now, comes before the change and stands for the facts."""
        if self._failure is not None and time.monotonic() < self._retry_at:
            raise self._failure  # fail fast between tries; a try rewrites the state
        facts = len(self._pending)
        try:
            # Damage done since the last commit is seen here, and the state written anew from
            # memory, which holds everything acknowledged.
            if self._db is None or self._damaged():
                self._rewrite(records[facts:])
            elif compact or self._due():
                self._commit(records[facts:], checkpoint=True)
            else:
                self._commit(records, checkpoint=False)
        except (sqlite3.Error, OSError) as error:
            self._close()  # a file that failed is written anew at the next try, from memory
            self._pending.clear()
            self._failure = _errno(error)
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            log.error("%s: %s", self.path, self._failure.strerror)
            raise self._failure from None
        if self._failure is not None:
            log.info("%s: written again", self.path)
            self._failure = None
        self._pending.clear()

    def _commit(self, records: list[Record], checkpoint: bool) -> None:
        db = self._db
        assert db is not None
        if len(records) == 1 and not checkpoint:  # one statement: a transaction of its own
            db.execute("INSERT INTO log (record) VALUES (?)", (json.dumps(records[0]),))
            self._log_rows += 1
            return
        db.execute("BEGIN")
        if checkpoint:
            db.execute("DELETE FROM log")
            db.execute("INSERT OR REPLACE INTO snapshot VALUES (1, ?)",
                       (json.dumps(self.snapshot()),))
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        db.executemany("INSERT INTO log (record) VALUES (?)",
                       [(json.dumps(record),) for record in records])
        db.execute("COMMIT")
        self._log_rows = len(records) + (0 if checkpoint else self._log_rows)

    def _due(self) -> bool:
        """A checkpoint costs the size of the state: it is due after eight times as many
        records, so that it costs at most an eighth of their writing."""
        return self._log_rows >= max(CHECKPOINT_MIN, 8 * self.size())

    def _close(self) -> None:
        if self._db is None:
            return
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()
        except sqlite3.Error:
            pass
        self._db = None

    # -- damage ---------------------------------------------------------------------------------

    def _remember_identity(self) -> None:
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        self._wal = _identity_and_size(self.path + "-wal")

    def _damaged(self) -> bool:
        """The file replaced or deleted, or its -wal replaced, deleted or truncated since this
        daemon wrote them (SQLite never shrinks the -wal of a connection it keeps open)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            info = None
        wal = _identity_and_size(self.path + "-wal")
        damaged = info is None or (info.st_dev, info.st_ino) != self._identity or (
            self._wal is not None and (wal is None or wal[0] != self._wal[0]
                                       or wal[1] < self._wal[1]))
        if damaged:
            log.error("%s or its -wal was changed behind the daemon's back: writing the state "
                      "anew", self.path)
        else:
            self._wal = wal
        return damaged

    def _rewrite(self, records: list[Record]) -> None:
        """The whole state from memory, and these records after it, into a fresh file put in
        place by rename(2)."""
        self._close()
        fresh = f"{self.path}.new"
        for name in (fresh, fresh + "-wal", fresh + "-journal"):
            _remove(name)
        try:
            os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            db = sqlite3.connect(fresh, isolation_level=None)
            try:
                db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
                db.execute("BEGIN")
                self._write_schema(db, self.snapshot())
                db.executemany("INSERT INTO log (record) VALUES (?)",
                               [(json.dumps(record),) for record in records])
                db.execute("COMMIT")
            finally:
                db.close()
            self._remove_files(keep_main=True)
            os.rename(fresh, self.path)
            if self.durable:
                _fsync_directory(os.path.dirname(self.path))
        except BaseException:
            _remove(fresh)
            raise
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._set_pragmas()
        self._db.execute("SELECT count(*) FROM log").fetchone()  # opens the -wal
        self._remember_identity()
        self._log_rows = len(records)

    def _remove_files(self, keep_main: bool = False) -> None:
        names = [self.path + "-wal", self.path + "-shm", self.path + "-journal"]
        for name in names if keep_main else [self.path, *names]:
            _remove(name)

    # -- stopping -------------------------------------------------------------------------------

    def close(self, remove: bool = False) -> None:
        """At a clean stop: compact, close, and for a runtime file, remove it."""
        self._failure = None  # one last try
        try:
            if not remove:
                self.checkpoint()
                assert self._db is not None
                # At rest without a -wal, so that even a read-only file system can open it.
                self._db.execute("PRAGMA journal_mode=DELETE")
        except (OSError, sqlite3.Error) as error:
            log.warning("journal: no checkpoint at stop (%s); the records stay", error)
        self._close()
        if remove:
            self._remove_files()
            _remove(self.path + ".lock")
        os.close(self._lock)


def _errno(error: Exception) -> OSError:
    if isinstance(error, OSError):
        return error
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if code == _SQLITE_FULL:
        return OSError(errno.ENOSPC, "the state file's disk is full: nothing was changed")
    return OSError(errno.EIO, f"the state file cannot be written ({error}): nothing was changed")


def _identity_and_size(path: str) -> tuple[tuple[int, int], int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino), info.st_size


def _make_private(path: str) -> None:
    """0600, as files made by this release are (the first one's were 0644)."""
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as error:
        log.warning("%s: cannot make it private: %s", path, error.strerror)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

