"""The daemon's wiring: the engine, membership, the file tables, the journal, the FUSE adapter
and the control socket, made for one mount and run on trio until it is unmounted."""

from __future__ import annotations

import errno
import gc
import logging
import os
import resource
import signal
from collections.abc import Callable

import pyfuse3
import trio

from ..control.protocol import CONTROL_XATTR, OVER_XATTR, PID_XATTR, default_control_path
from ..control.server import Limits, serve_control
from ..control.service import ControlService
from ..engine import Hierarchy, new_engine
from ..engine.budget import Budget
from ..files.kernfs import Kernfs
from ..fuse import loop
from ..fuse.adapter import CgroupOperations, mount_options
from ..fuse.inotify import ModifyNotifier
from ..over.kernfs import OverKernfs
from ..over.membership import KernelMembership
from ..over.tree import KernelTree, kernel_controllers
from ..procs.tracker import ProcessTracker
from ..procs.watcher import ProcessWatcher
from ..state.changes import Changes, Record
from ..state.operations import Op
from ..state.restore import restore
from ..state.store import StateStore, runtime_state_path
from . import metrics
from .bus import EventBus
from .config import Config
from .controllers import CONTROLLERS
from .sdnotify import sd_notify
from .supervisor import STRAY_SIGNALS, restarts, supervisor_pid

log = logging.getLogger(__name__)

# Entries and attributes may be cached this long; whatever changes them is invalidated at once
# (see fuse/adapter.py for the one exception).
CACHE_TIMEOUT = 1.0
# Descriptors kept for the FUSE device, the journal, /proc reads, threads and logging; the rest
# go to control connections (a quarter, up to 1024) and pidfds of watched processes.
FD_RESERVE = 256
MAX_CONNECTIONS = 1024


def raise_fd_limit() -> int:
    """Take the hard limit on descriptors as the soft one (the 1024 a shell hands down is far
    too few for a pidfd per watched process); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def serve(mountpoint: str, config: Config, ready: Callable[[], None]) -> None:
    """Mount, call ready(), and serve until unmounted or told to stop by SIGTERM/SIGINT."""
    names = config.controllers
    if config.over is not None:
        names = [name for name in names if name not in kernel_controllers(config.over)]
    offered = [CONTROLLERS[name] for name in names]
    owners = frozenset({0, os.geteuid()})  # root and the mount's owner: the reserve is theirs
    share = config.user_share / 100

    # What the process events and the kernel's tree report, journalled as facts.
    def changed() -> None:
        """After a change from elsewhere than a FUSE request (which delivers its own)."""
        bus.deliver()
        operations.invalidate_soon()

    def on_fork(parent: int, child: int, start: int | None, creator: int | None) -> None:
        try:
            changes.fact(Op.FORK, parent, child, start, creator)
        except OSError as error:
            # A controller refused the fork (as pids.max fails fork(2)); it happened already,
            # so the child dies before it does much, uncounted, as if it had never been.
            log.info("fork of %d by %d refused: %s", child, parent, error.strerror)
            if isinstance(tracker, ProcessTracker):  # the one that reports forks
                tracker.kill([child])

    def on_threads(pid: int, threads: list[int]) -> None:
        changes.fact(Op.THREADS, pid, threads)

    def on_exit(pid: int) -> None:
        changes.fact(Op.EXIT, pid)

    def on_mirrored(op: Op, *args: object) -> None:
        """A cgroup the kernel made or removed (--over)."""
        changes.fact(op, *args)

    def frozen(pid: int) -> bool:
        return hierarchy.freezer.freezing(pid)

    @_process_event
    def on_stopped(pid: int, stopped: bool) -> None:
        hierarchy.freezer.set_stopped(pid, stopped)
        changed()

    fd_limit = raise_fd_limit()
    max_connections = min(MAX_CONNECTIONS, fd_limit // 4)
    pidfd_budget = max(0, fd_limit - FD_RESERVE - max_connections)

    def kernel_membership(hierarchy: Hierarchy) -> KernelMembership:
        """Under --over: the kernel's tree at DIR, which the hierarchy mirrors."""
        assert config.over is not None
        tree = KernelTree(config.over, hierarchy, on_mirrored)
        # The kernel's files open through the mount hold a descriptor each: half the budget.
        return KernelMembership(tree, on_exit, pidfd_budget // 2, changed)

    engine = new_engine(config.capacities, config.first_ids,
                        tuple(controller for controller, _ in offered), config.max_cgroups,
                        Budget("cgroups", config.max_cgroups, errno.EAGAIN, owners, share),
                        config.kernel_interface, config.snp_asids,
                        None if config.over is None else kernel_membership)
    hierarchy = engine.hierarchy
    bus = EventBus(hierarchy)
    tables = [files for _, files in offered]
    control = config.control or default_control_path(mountpoint)
    root_xattrs = {PID_XATTR: str(os.getpid()), CONTROL_XATTR: control}
    if config.over is not None:  # for encidfs exec: its cgroup namespace
        root_xattrs[OVER_XATTR] = config.over
    tree: KernelTree | None = None
    tracker: ProcessWatcher
    kernfs: Kernfs
    if config.over is None:
        exempt = frozenset({os.getpid(), supervisor_pid() or 0})  # never frozen or killed
        tracker = ProcessTracker(hierarchy.procs.members, on_fork, on_exit, frozen, on_stopped,
                                 use_connector=config.proc_connector, exempt=exempt,
                                 pidfd_budget=pidfd_budget, split=hierarchy.threads.split,
                                 on_threads=on_threads, on_settled=changed)
        kernfs = Kernfs(hierarchy, tracker, tables, owners=owners, share=share,
                        root_xattrs=root_xattrs)
    else:
        membership = hierarchy.membership
        assert isinstance(membership, KernelMembership)
        tracker, tree = membership, membership.tree
        kernfs = OverKernfs(hierarchy, tree, membership, tables, pidfd_budget // 2, owners,
                            share, root_xattrs)
    # Without --state, a runtime file: a daemon that dies loses nothing, a reboot starts afresh.
    runtime = config.state is None
    store = StateStore(config.state or runtime_state_path(mountpoint), config.layout(),
                       durable=not runtime, runtime=runtime)
    journal = _FlushedSoon(store)
    changes = Changes(engine, kernfs, journal)
    restart_log = restarts()
    request_metrics = (metrics.serve(*config.metrics, engine, len(restart_log))
                       if config.metrics else None)
    operations = CgroupOperations(kernfs, changes, CACHE_TIMEOUT, bus, request_metrics)
    bus.consumers.append(operations.consume)  # kernfs: invalidation and poll
    for note in config.capacity_notes:
        log.warning("%s", note)
    limitations = [*config.capacity_notes, *tracker.limitations]
    notifier = ModifyNotifier(kernfs, mountpoint) if ModifyNotifier.available() else None
    if notifier:
        bus.consumers.append(notifier.consume)  # inotify: IN_MODIFY
    else:
        limitations.append("truncating read-only files needs CAP_DAC_OVERRIDE: inotify does "
                           "not see the changes the daemon makes itself (poll(2) does)")
    service = ControlService(mountpoint, engine, tracker, changes, changed, restart_log,
                             limitations, config.capacity_source, request_metrics)
    restored = restore(store, changes, tracker.start_time_now)
    if tree is not None:
        gone = tree.reconcile()  # the kernel's tree as it is now
        log.info("over %s: %d cgroups; %d of those restored were gone", tree.top,
                 len(hierarchy.by_id), gone)
        kernfs.consume(hierarchy.drain_events())  # nothing is mounted yet
    pyfuse3.init(operations, mountpoint,
                 mount_options("encidfs", config.fuse_options, everyone=os.geteuid() == 0))
    clean = False
    try:
        operations.invalidator.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            if notifier:
                await nursery.start(notifier.run)
            # The processes as they were, even if their PID is reused.
            tracker.resume({pid: changes.starts[pid] for pid in restored})
            nursery.start_soon(journal.flush_facts)
            await nursery.start(serve_control, control, service,
                                Limits(max_connections, owners, share), config.control_mode,
                                config.control_group)
            log.info("process tracking: %s; control socket %s; %d descriptors",
                     tracker.mode, control, fd_limit)
            await nursery.start(_stop_on_signal)
            log.info("mounted on %s with %s (from %s); controllers %s; misc of Linux %s",
                     mountpoint, config.capacities, config.capacity_source,
                     " ".join(config.controllers), config.kernel_interface)
            gc.freeze()  # what start-up made lives on: keep it out of every collection
            ready()
            capacities = " ".join(f"{name} {n}" for name, n in config.capacities.items())
            sd_notify("READY=1", f"STATUS=mounted on {mountpoint}: {capacities}; "
                              f"{len(hierarchy.by_id)} cgroups; {tracker.mode}")
            loop.install()
            await pyfuse3.main(min_tasks=1, max_tasks=1)  # see fuse/adapter.py
            clean = True
            nursery.cancel_scope.cancel()
    finally:
        sd_notify("STOPPING=1", f"STATUS=unmounting {mountpoint}")
        operations.invalidator.stop(timeout=1.0)
        pyfuse3.close(unmount=True)
        if clean:
            store.close(remove=runtime)  # a runtime state ends with its mount
        log.info("unmounted %s", mountpoint)


class _FlushedSoon:
    """The store as the changes' journal: facts are flushed as soon as the daemon is idle, all
    those staged meanwhile in one commit."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._staged = trio.Event()

    def append(self, record: Record) -> None:
        self.store.append(record)

    def append_all(self, records: list[Record]) -> None:
        self.store.append_all(records)

    def stage(self, record: Record) -> None:
        self.store.stage(record)
        self._staged.set()

    async def flush_facts(self) -> None:
        while True:
            await self._staged.wait()
            self._staged = trio.Event()
            try:
                self.store.flush()
            except Exception:  # a bug: the facts wait for the next write, the daemon goes on
                log.exception("flushing the journal failed")


def _process_event(handler: Callable[..., None]) -> Callable[..., None]:
    """A process event that fails (a bug) is logged; it never stops the daemon."""

    def guarded(*args: int | None) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("process event %s%r failed", handler.__name__, args)

    return guarded


async def _stop_on_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """SIGTERM and SIGINT unmount cleanly; the others that would kill are logged and ignored."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *STRAY_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            if signum in STRAY_SIGNALS:
                log.info("%s: ignored", signal.Signals(signum).name)
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(mountpoint: str, config: Config, ready: Callable[[], None]) -> None:
    for signum in STRAY_SIGNALS:  # until _stop_on_signal logs them
        signal.signal(signum, signal.SIG_IGN)
    trio.run(serve, mountpoint, config, ready)
