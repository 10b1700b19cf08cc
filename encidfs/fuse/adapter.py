"""The FUSE adapter: pyfuse3 requests in, file-table calls, FUSE replies out.

It translates and nothing more: inode numbers and names go to the file table, OSErrors come
back as FUSE errors, and entries the file table reports stale are invalidated in the kernel.
No cgroup rule lives here.

The daemon serves its requests one at a time (one pyfuse3 worker, whose read lock is taken
without a pass of the scheduler: see loop.py), so nothing a request waits for may itself wait
for another request.  A kernel invalidation can:
it takes the directory's lock, which a lookup in that directory holds until we answer it.
Invalidations therefore run in a thread of their own, and a reply waits for them only a
moment (INVALIDATION_GRACE): time enough when nothing holds the lock, so that a file gone is
gone before the write that removed it returns, as on cgroupfs; and never a deadlock.
"""

from __future__ import annotations

import errno
import functools
import logging
import queue
import select
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import pyfuse3
import trio

from ..engine.events import Event
from ..files.cftype import Caller, Changes
from ..files.kernfs import Kernfs, Node
from ..files.openfile import FileHandle

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Seconds a reply waits for the invalidations its request made (they take microseconds unless
# a request in the same directory holds its lock; that one is served right after the reply).
INVALIDATION_GRACE = 0.005


class Bus(Protocol):
    def pending(self) -> bool: ...

    def deliver(self) -> None: ...


class Metrics(Protocol):
    """What a request is counted and timed in (daemon/metrics.py RequestMetrics)."""

    def observe(self, interface: str, kind: str, seconds: float) -> None: ...


def translated(method: F) -> F:
    """OSError becomes its errno; anything else (a bug, a state file that cannot be written)
    is logged and answered EIO, and the daemon goes on.  Changes are applied (and made
    durable) before the reply.  With metrics, the request is counted and timed."""

    @functools.wraps(method)
    async def wrapper(self: CgroupOperations, *args: Any) -> Any:
        start = time.perf_counter() if self.metrics is not None else 0.0
        try:
            try:
                return await method(self, *args)
            finally:
                if self.bus.pending():
                    self.bus.deliver()
                    await self.invalidate()
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s%r failed", method.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if self.metrics is not None:
                self.metrics.observe("fuse", method.__name__, time.perf_counter() - start)

    return cast(F, wrapper)


class Invalidator:
    """Directory entries dropped from the kernel's cache, in the order given, by one thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[list[tuple[int, bytes]], trio.Event] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="invalidate", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """From the event loop, once mounted."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

    def submit(self, entries: list[tuple[int, bytes]]) -> trio.Event:
        """Queue entries to invalidate; the event is set once the kernel has dropped them."""
        done = trio.Event()
        self._queue.put((entries, done))
        return done

    def stop(self, timeout: float) -> None:
        """Before the session closes: the thread must not notify a session that is gone."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        assert self._token is not None
        while (work := self._queue.get()) is not None:
            entries, done = work
            for dir_inode, name in entries:
                try:
                    pyfuse3.invalidate_entry(dir_inode, name)
                except FileNotFoundError:
                    pass  # the kernel had not cached it
                except OSError as error:  # the mount is going away
                    log.warning("invalidating %r: %s", name, error)
                except Exception:  # a bug: the entry stays cached until its timeout
                    log.exception("invalidating %r failed", name)
            try:
                self._token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                return


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    if ctx.uid == 0:
        return Caller(ctx.pid, ctx.uid, ctx.gid)
    try:
        groups = frozenset(pyfuse3.get_sup_groups(ctx.pid))
    except OSError:
        groups = frozenset()  # the caller is gone already
    return Caller(ctx.pid, ctx.uid, ctx.gid, groups)


class CgroupOperations(pyfuse3.Operations):
    def __init__(self, kernfs: Kernfs, changes: Changes, cache_timeout: float,
                 bus: Bus, metrics: Metrics | None = None) -> None:
        """A request's changes go through `changes` (journalled, then applied); `bus` is the
        engine's event bus: after each request it is delivered to its consumers, of which
        consume() is one.  With `metrics` (--metrics), requests are counted and timed."""
        super().__init__()
        self.kernfs = kernfs
        self.changes = changes
        self.cache_timeout = cache_timeout
        self.bus = bus
        self.metrics = metrics
        self._open_files: dict[int, FileHandle] = {}
        self._open_dirs: dict[int, list[tuple[bytes, Node]]] = {}
        # inode -> open file -> the handle to wake its poller with (one per open file)
        self._pollers: dict[int, dict[int, pyfuse3.PollHandle]] = {}
        self._stale: list[tuple[int, bytes]] = []  # directory entries to invalidate
        self.invalidator = Invalidator()
        self._next_fh = 1

    def consume(self, batch: list[Event]) -> None:
        """A batch from the event bus: wake the pollers of the files it notifies, and keep the
        directory entries it makes stale for invalidate() or invalidate_soon()."""
        stale, notified = self.kernfs.consume(batch)
        for inode in notified:
            for handle in self._pollers.pop(inode, {}).values():
                handle.notify()
        self._stale += stale

    async def invalidate(self) -> None:
        """After a request: files that vanished are gone from the kernel's cache before the
        reply, unless a request in their directory holds its lock (see the module's doc)."""
        stale, self._stale = self._stale, []
        if stale:
            done = self.invalidator.submit(stale)
            with trio.move_on_after(INVALIDATION_GRACE):
                await done.wait()

    def invalidate_soon(self) -> None:
        """After a change from elsewhere (process events, the control socket)."""
        stale, self._stale = self._stale, []
        if stale:
            self.invalidator.submit(stale)

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = self.kernfs.attr(node)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        entry.entry_timeout = self.cache_timeout if self.kernfs.entry_cached(node) else 0.0
        entry.attr_timeout = self.cache_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = self.kernfs.nlink(node)
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_size = 0
        entry.st_blksize = 4096
        entry.st_blocks = 0
        entry.st_atime_ns = attr.mtime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- names and attributes -----------------------------------------------------------------

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        return self._entry(self.kernfs.lookup(parent_inode, name))

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return self._entry(self.kernfs.node(inode))

    @translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext):
        node = self.kernfs.node(inode)
        # A size change (O_TRUNC, truncate) is accepted and means nothing, as on kernfs.
        self.kernfs.setattr(
            node, self.changes,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(node)

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext):
        stat = pyfuse3.StatvfsData()
        stat.f_bsize = stat.f_frsize = 4096
        stat.f_namemax = 255
        return stat

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        return self.kernfs.getxattr(self.kernfs.node(inode), name)

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return self.kernfs.listxattr(self.kernfs.node(inode))

    @translated
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext):
        self.kernfs.setxattr(self.kernfs.node(inode), name, value, _caller(ctx),
                             self.changes)

    @translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        self.kernfs.removexattr(self.kernfs.node(inode), name, self.changes)

    # -- directories --------------------------------------------------------------------------

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext):
        fh = self._new_fh()
        self._open_dirs[fh] = self.kernfs.entries(inode)
        return fh

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken):
        entries = self._open_dirs[fh]
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            try:
                entry = self._entry(node)
            except OSError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                return

    @translated
    async def releasedir(self, fh: int):
        del self._open_dirs[fh]

    @translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        return self._entry(self.kernfs.mkdir(parent_inode, name, mode, _caller(ctx),
                                             self.changes))

    @translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        self.kernfs.rmdir(parent_inode, name, self.changes)

    # cgroupfs has no way to make or change names other than mkdir/rmdir; these are its errnos.

    @translated
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise OSError(errno.EPERM, "cgroups cannot be renamed")

    @translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        raise OSError(errno.EPERM, "interface files cannot be removed")

    @translated
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        raise OSError(errno.EPERM, "no links in cgroupfs")

    @translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        raise OSError(errno.EPERM, "no symlinks in cgroupfs")

    @translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx):
        raise OSError(errno.EACCES, "files cannot be created")

    @translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        raise OSError(errno.EACCES, "files cannot be created")

    # -- files --------------------------------------------------------------------------------

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext):
        open_file = self.kernfs.open(self.kernfs.node(inode), _caller(ctx), flags)
        fh = self._new_fh()
        self._open_files[fh] = open_file
        # Contents are generated per read and the size is 0: the page cache must stay out.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @translated
    async def read(self, fh: int, off: int, size: int):
        return self._open_files[fh].read(off, size)

    @translated
    async def write(self, fh: int, off: int, buf: bytes):
        return self._open_files[fh].write(buf, self.changes)

    @translated
    async def poll(self, inode: int, fh: int, handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext):
        """As kernfs: always readable and writable; POLLPRI|POLLERR once notified."""
        open_file = self._open_files[fh]
        mask = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
        if open_file.changed():
            return mask | select.POLLERR | select.POLLPRI
        if handle is not None:
            self._pollers.setdefault(inode, {})[fh] = handle
        return mask

    @translated
    async def release(self, fh: int):
        open_file = self._open_files.pop(fh)
        self._pollers.get(open_file.node.inode, {}).pop(fh, None)
        open_file.close()


def mount_options(fsname: str, extra: list[str], everyone: bool) -> set[str]:
    """FUSE options: the kernel checks permissions against our modes, as it does on cgroupfs;
    with `everyone` (root's mount), every user may ask, as on cgroupfs (FUSE's default refuses
    all but the mounting user before the modes are looked at)."""
    return {f"fsname={fsname}", "subtype=encidfs", "default_permissions",
            *(["allow_other"] if everyone else []), *extra}

