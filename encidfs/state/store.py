"""The state file: a snapshot in SQLite, and an append-only log of the changes since.

    FILE      SQLite: meta (application, schema, layout, generation; boot for runtime files)
              and snapshot (one row: the whole state as JSON: engine, nodes, start times)
    FILE.log  the records made since that snapshot: a first line naming its generation, then
              one line per commit, a JSON list of records

A record is appended before its change is applied (see changes.py); a durable store has it on
disk (fdatasync) before that.  A failure to append is an error for the request (ENOSPC for a
full disk, EIO otherwise) and the change does not happen: a commit is one line, and a line
without its newline (cut short by a crash or a full disk) is no commit.  Facts (forks, exits)
wait in memory and go in with the next record or flush.

A checkpoint writes the whole state from memory into a fresh FILE and a fresh FILE.log of the
next generation, each put in place by rename(2), FILE first: a log of another generation than
the snapshot's is older than it and is not read.  The same is done when a write failed, or when
either file was changed behind the daemon's back (deleted, replaced, truncated), which the next
write sees before it appends: memory holds everything acknowledged.  Until that works (it is
tried again every second), every change is refused.  The log is not a SQLite table because an
append costs half an INSERT in the daemon (7 against 15 us a change with its JSON, measured).

The files are 0600; a lock file beside them (FILE.lock, flock) keeps a second daemon out for as
long as the first runs.
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

from ..host.runtime import runtime_path
from .changes import Record

log = logging.getLogger(__name__)

# 2: encids only, charges per controller; 3: allocations across controllers; 4: FILE.log
SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL);
"""
_LOG_MAGIC = "encidfs-log"
CHECKPOINT_MIN = 10_000  # records; more when the state is larger (see _due)
RETRY_INTERVAL = 1.0  # seconds between tries to write a file that failed
_SQLITE_FULL = 13
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
        """`durable`: every commit is on disk before it returns (fdatasync); without, it
        survives the daemon's death but not the machine's (a runtime file on /run).
        `runtime`: a file left from another boot is started afresh, as a reboot would."""
        self.path = path
        self.log_path = path + ".log"
        self.layout = json.loads(json.dumps(layout, sort_keys=True))
        self.durable = durable
        self.runtime = runtime
        self._snapshot: Callable[[], dict] = dict  # the state now, from open() on
        self._size: Callable[[], int] = lambda: 0
        self._pending: list[Record] = []
        self._generation = 0
        self._log_rows = 0
        # Open while the files are good: the log (O_APPEND) and its length, and the snapshot
        # file, held to see it deleted or replaced.  None: the next write writes both anew.
        self._log: int | None = None
        self._log_size = 0
        self._snapshot_file: int | None = None
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

    def open(self, snapshot: Callable[[], dict], size: Callable[[], int] = lambda: 0
             ) -> tuple[dict | None, list[Record], sqlite3.Connection | None]:
        """Read the file (or create it); return its snapshot and records, and a connection
        to a file of schema 1 (to be read by the caller, then written anew), or None.
        From now on the store keeps the state `snapshot()` returns, whose checkpoint costs
        about `size()` entries."""
        self._snapshot, self._size = snapshot, size
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            db = self._connect_existing()
            meta = self._meta(db)
            if meta.get("schema") == "1":
                return None, [], db
            try:
                if not (self.runtime and meta.get("boot") != boot_id()):
                    # An older snapshot is read as it is (restore.py upgrades it); the first
                    # checkpoint writes it, and the schema, anew.
                    data, records = self._read(db, meta)
                    self._log_rows = len(records)
                    _make_private(self.path)
                    return data, records, None
                log.info("%s is from another boot: starting afresh", self.path)
            finally:
                db.close()
        self._remove_files()
        try:
            self._checkpoint([])
        except (OSError, sqlite3.Error) as error:
            raise StateError(f"cannot create {self.path}: {_refusal(error).strerror}") from None
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
        elif meta.get("schema") not in ("1", "2", "3", str(SCHEMA_VERSION)):
            problem = (f"{self.path} has state format {meta.get('schema')}, this encidfs reads "
                       f"1 to {SCHEMA_VERSION}; it is left as it is")
        elif json.loads(meta.get("layout", "null")) != self.layout:
            problem = (f"{self.path} was made for other resource types or capacities "
                       f"({meta.get('layout')}); mount with those, or use another file")
        if problem:
            db.close()
            raise StateError(problem)
        return meta

    def _read(self, db: sqlite3.Connection,
              meta: dict[str, str]) -> tuple[dict | None, list[Record]]:
        try:
            self._generation = int(meta.get("generation", "0"))
            row = db.execute("SELECT data FROM snapshot").fetchone()
            if meta["schema"] in ("2", "3"):  # the records were a table of the file
                records = [tuple(json.loads(text)) for (text,) in
                           db.execute("SELECT record FROM log ORDER BY seq")]
            else:
                records = self._read_log()
            return (json.loads(row[0]) if row else None), records
        except (sqlite3.DatabaseError, ValueError, TypeError) as error:
            raise StateError(f"{self.path} cannot be read ({error}); it is left as it is") \
                from None

    def _read_log(self) -> list[Record]:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            log.warning("%s is missing: the state is its snapshot's", self.log_path)
            return []
        *commits, torn = lines
        if not commits or json.loads(commits[0]) != [_LOG_MAGIC, self._generation]:
            return []  # older than the snapshot: a crash came between their renames
        if torn:
            log.warning("%s: its last commit was cut short (never acknowledged): it is left "
                        "out", self.log_path)
        return [tuple(record) for line in commits[1:] for record in json.loads(line)]

    # -- writing --------------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        self._write([*self._pending, record])

    def append_all(self, records: list[Record]) -> None:
        self._write([*self._pending, *records])

    def stage(self, record: Record) -> None:
        self._pending.append(record)

    def flush(self) -> None:
        """Commit the facts waiting; on failure they are in the next checkpoint's snapshot."""
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
        """Commit records, or raise OSError with the files as they were.  The first records
        are the facts waiting (applied already); the rest are changes not applied yet.  So a
        snapshot, taken now, comes before the changes and stands for the facts."""
        if self._failure is not None and time.monotonic() < self._retry_at:
            raise self._failure  # fail fast between tries; a try writes the state anew
        facts = len(self._pending)
        try:
            if self._log is None or self._damaged() or compact or self._due():
                self._checkpoint(records[facts:])
            else:
                self._append(records)
        except (sqlite3.Error, OSError) as error:
            self._close()  # files that failed are written anew at the next try, from memory
            self._pending.clear()
            self._failure = _refusal(error)
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            log.error("%s: %s", self.path, self._failure.strerror)
            raise self._failure from None
        if self._failure is not None:
            log.info("%s: written again", self.path)
            self._failure = None
        self._pending.clear()

    def _append(self, records: list[Record]) -> None:
        assert self._log is not None
        line = (json.dumps(records) + "\n").encode()
        try:
            if os.write(self._log, line) != len(line):
                raise OSError(errno.ENOSPC, "the state's log is full")
            if self.durable:
                os.fdatasync(self._log)
        except OSError:
            try:  # a part written is no commit, but nothing may follow it
                os.ftruncate(self._log, self._log_size)
            except OSError:
                pass  # the log is written anew before the next commit all the same
            raise
        self._log_size += len(line)
        self._log_rows += len(records)

    def _due(self) -> bool:
        """A checkpoint costs the size of the state: it is due after eight times as many
        records, so that it costs at most an eighth of their writing."""
        return self._log_rows >= CHECKPOINT_MIN and self._log_rows >= 8 * self._size()

    def _damaged(self) -> bool:
        """Either file deleted or replaced, or the log's length not what this daemon made
        it, since the last commit."""
        assert self._log is not None and self._snapshot_file is not None
        log_info = os.fstat(self._log)
        damaged = (log_info.st_nlink == 0 or log_info.st_size != self._log_size
                   or os.fstat(self._snapshot_file).st_nlink == 0)
        if damaged:
            log.error("%s or its log was changed behind the daemon's back: writing the state "
                      "anew", self.path)
        return damaged

    def _checkpoint(self, records: list[Record]) -> None:
        """The whole state from memory into FILE, and these records after it into FILE.log,
        both of the next generation, each written fresh and put in place by rename(2)."""
        self._close()
        generation = self._generation + 1
        fresh, fresh_log = f"{self.path}.new", f"{self.log_path}.new"
        for name in (fresh, fresh + "-journal", fresh_log):
            _remove(name)
        try:
            os.close(os.open(fresh, _NEW, 0o600))
            db = sqlite3.connect(fresh, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=OFF")  # a file no one reads until renamed
                db.execute("BEGIN")
                self._write_schema(db, generation)
                db.execute("COMMIT")
            finally:
                db.close()
            text = json.dumps([_LOG_MAGIC, generation]) + "\n"
            if records:
                text += json.dumps(records) + "\n"
            data = text.encode()
            log_fd = os.open(fresh_log, _NEW | os.O_APPEND, 0o600)
            try:
                if os.write(log_fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "the state's log is full")
                if self.durable:
                    os.fsync(log_fd)
                    _fsync_file(fresh)
                # No -wal or -journal of an older file may be taken for the new one's.
                self._remove_files(keep_main=True)
                os.rename(fresh, self.path)
                if self.durable:  # before the log's: a new log beside the old snapshot is ignored
                    _fsync_directory(os.path.dirname(self.path))
                os.rename(fresh_log, self.log_path)
                if self.durable:
                    _fsync_directory(os.path.dirname(self.path))
            except BaseException:
                os.close(log_fd)
                raise
        except BaseException:
            _remove(fresh)
            _remove(fresh_log)
            raise
        self._log, self._log_size = log_fd, len(data)
        self._snapshot_file = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._generation = generation
        self._log_rows = len(records)

    def _write_schema(self, db: sqlite3.Connection, generation: int) -> None:
        """The tables, the meta rows and the snapshot (in the caller's transaction)."""
        meta = [("application", "encidfs"), ("schema", str(SCHEMA_VERSION)),
                ("layout", json.dumps(self.layout, sort_keys=True)),
                ("generation", str(generation))]
        if self.runtime:
            meta.append(("boot", boot_id()))
        for statement in _SCHEMA.split(";")[:-1]:
            db.execute(statement)
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        db.execute("INSERT INTO snapshot VALUES (1, ?)", (json.dumps(self._snapshot()),))

    def _close(self) -> None:
        for fd in (self._log, self._snapshot_file):
            if fd is not None:
                os.close(fd)
        self._log = self._snapshot_file = None

    def _remove_files(self, keep_main: bool = False) -> None:
        """The files and what an older release's SQLite kept beside them."""
        names = [self.path + "-wal", self.path + "-shm", self.path + "-journal"]
        for name in names if keep_main else [self.path, self.log_path, *names]:
            _remove(name)

    # -- stopping -------------------------------------------------------------------------------

    def close(self, remove: bool = False) -> None:
        """At a clean stop: compact, close, and for a runtime file, remove it."""
        self._failure = None  # one last try
        if not remove:
            try:
                self.checkpoint()
            except OSError as error:
                log.warning("journal: no checkpoint at stop (%s); the records stay",
                            error.strerror)
        self._close()
        if remove:
            self._remove_files()
            _remove(self.path + ".lock")
        os.close(self._lock)


def _refusal(error: Exception) -> OSError:
    """What a change the state file could not take is refused with."""
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
            or getattr(error, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL)
    if full:
        return OSError(errno.ENOSPC, "the state file's disk is full: nothing was changed")
    reason = error.strerror if isinstance(error, OSError) else error
    return OSError(errno.EIO, f"the state file cannot be written ({reason}): nothing was changed")


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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

