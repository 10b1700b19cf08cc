"""cgroup.freeze for processes the kernel's freezer knows nothing of.

The kernel's freezer is invisible: a frozen task just does not run, whatever signals it gets;
its parent's wait() sees no stop; a task stopped before the freeze stays stopped after it; a
task that cannot take a signal (a parent waiting in vfork()) counts as frozen and stops the
moment it returns.  User space comes closest with ptrace: the daemon seizes every thread of a
frozen process and interrupts it (PTRACE_SEIZE, PTRACE_INTERRUPT), which holds it in a trace
stop that SIGCONT cannot end and its parent does not see; a thaw detaches (PTRACE_DETACH), giving
back any signal that arrived meanwhile, and leaves a process that was stopped before as it was.
A thread in vfork() is interrupted as well: it counts as stopped, and traps as it returns.

Where ptrace is refused (another tracer holds the process, or a user's daemon may not trace),
the freezer falls back to SIGSTOP: a process stopped already is counted as it is and never
resumed by the freezer, and one that runs again is stopped again when seen (every check()).

Tracees report their stops and exits to the daemon (SIGCHLD); a traced thread that exits must
be waited for by the daemon before its parent can reap it, so every SIGCHLD reaps them.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import signal
from collections.abc import Callable, Iterable

import trio

from .procfs import state_of

log = logging.getLogger(__name__)

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: threads too
CLONE_VFORK = 0x4000
# System call numbers of vfork(), clone() and clone3() (which has its flags in memory).
_VFORK_CALLS = {"x86_64": (58, 56, 435), "aarch64": (None, 220, 435)}.get(platform.machine(),
                                                                          (None, None, None))
CHECK_FIRST = 0.0005  # seconds before the first look at a process told to stop, doubling...
CHECK_MOST = 0.05  # ...up to this, while any is not stopped yet or held by SIGSTOP

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, tid: int, data: int = 0) -> None:
    if _libc.ptrace(request, tid, None, data) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _taken(signum: int, frame: object) -> None:
    """A SIGCHLD no receiver is waiting for: the freezer's next check reaps what it tells."""


class _Held:
    """A process the freezer holds."""

    __slots__ = ("pid", "threads", "signalled", "ours", "stopped", "releasing")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Traced TIDs, each None until its stop is seen, then the signal to give back when
        # it is let go (0 for none).
        self.threads: dict[int, int | None] = {}
        self.signalled = False  # held with SIGSTOP instead (ptrace refused)
        self.ours = False  # held with SIGSTOP that the freezer sent: SIGCONT gives it back
        self.stopped = False  # as reported
        self.releasing = False  # thawed: threads not stopped yet are let go once they are


class Freezer:
    def __init__(self, freezing: Callable[[int], bool], on_stopped: Callable[[int, bool], None],
                 exempt: frozenset[int], proc: str = "/proc") -> None:
        self._freezing = freezing  # whether the freezer covers a process's cgroup
        self._on_stopped = on_stopped
        # The daemon's own processes: never stopped (the kernel never freezes itself); they
        # count as stopped, so that `frozen` is reached.
        self._exempt = exempt
        self._proc = proc
        self._held: dict[int, _Held] = {}
        self._wake = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_sigchld)
            delay = CHECK_FIRST
            while True:
                pending = any(not held.stopped or held.signalled or held.releasing
                              for held in self._held.values())
                with trio.move_on_after(delay if pending else math.inf) as waited:
                    await self._wake.wait()
                self._wake = trio.Event()
                self.check()
                delay = min(delay * 2, CHECK_MOST) if waited.cancelled_caught else CHECK_FIRST

    async def _on_sigchld(self) -> None:
        # What the receiver gives back as it closes: a Python handler, so that a SIGCHLD that
        # comes as it closes is taken (left to no handler, CPython reports a "race").
        signal.signal(signal.SIGCHLD, _taken)
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            async for _ in signals:
                if self._held:
                    self._wake.set()

    def apply(self, pids: Iterable[int]) -> None:
        """Stop the processes the freezer covers and let go of the ones it no longer does."""
        for pid in pids:
            try:
                held = self._held.get(pid)
                if self._freezing(pid):
                    if held is None or held.releasing:
                        self._hold(held or self._held.setdefault(pid, _Held(pid)))
                elif held is not None and not held.releasing:
                    self._release(held)
            except ProcessLookupError:
                pass  # its exit is on its way
            except PermissionError:  # a user's daemon, and a child that became setuid
                log.warning("the freezer cannot stop process %d", pid)

    def check(self, signalled_only: bool = False) -> None:
        """Take the stops and exits the tracees report, count the processes that have stopped,
        stop again one held by SIGSTOP that runs again, and let go of what was thawed (only
        the second, with `signalled_only`: what a read must not miss)."""
        for held in list(self._held.values()):
            if signalled_only and not held.signalled:
                continue
            try:
                self._check(held)
            except ProcessLookupError:
                pass  # its exit is on its way
            except PermissionError:
                log.warning("the freezer cannot stop process %d", held.pid)
            except Exception:  # a bug: this process alone
                log.exception("the freezer failed on process %d", held.pid)

    def exited(self, pid: int) -> None:
        """The process is gone: what is left of its threads is waited for."""
        held = self._held.pop(pid, None)
        if held is not None:
            self._reap(held)

    # -- holding and letting go ----------------------------------------------------------------

    def _hold(self, held: _Held) -> None:
        held.releasing = False
        if held.pid in self._exempt:
            self._report(held, True)
            return
        if not held.signalled:
            try:
                self._trace(held)
            except PermissionError:
                if held.threads:
                    raise
                held.signalled = True
        if held.signalled:
            self._stop_by_signal(held)
        self._wake.set()

    def _trace(self, held: _Held) -> None:
        """Seize and interrupt every thread not traced yet (PermissionError if one cannot be:
        another tracer holds it, or the daemon may not trace)."""
        for tid in self._tasks(held.pid):
            if tid in held.threads:
                continue
            try:
                _ptrace(PTRACE_SEIZE, tid)
            except ProcessLookupError:
                continue  # the thread has exited
            held.threads[tid] = None
            try:
                _ptrace(PTRACE_INTERRUPT, tid)
            except ProcessLookupError:
                pass  # exiting: its exit is reaped

    def _stop_by_signal(self, held: _Held) -> None:
        state = state_of(held.pid, held.pid, self._proc)
        if state in ("T", "t") or self._in_vfork(held.pid, held.pid, state):
            return  # stopped by another, or stops as it returns: counted as it is
        os.kill(held.pid, signal.SIGSTOP)
        held.ours = True

    def _release(self, held: _Held) -> None:
        held.releasing = True
        self._report(held, False)
        if held.pid in self._exempt or held.signalled:
            if held.ours:
                os.kill(held.pid, signal.SIGCONT)
            del self._held[held.pid]
            return
        self._detach_stopped(held)

    def _detach_stopped(self, held: _Held) -> None:
        """Let go of every thread that has stopped; the process is let go once all are."""
        for tid, stop in list(held.threads.items()):
            if stop is not None:
                try:
                    _ptrace(PTRACE_DETACH, tid, stop)
                except ProcessLookupError:
                    pass  # killed meanwhile
                del held.threads[tid]
        if not held.threads:
            del self._held[held.pid]

    # -- what the tracees report ---------------------------------------------------------------

    def _check(self, held: _Held) -> None:
        self._reap(held)
        if held.releasing:
            self._detach_stopped(held)
            return
        if held.pid in self._exempt:
            return
        if held.signalled:
            state = state_of(held.pid, held.pid, self._proc)
            if state is None or state in ("Z", "X"):
                return  # its exit is on its way
            if state in ("T", "t") or self._in_vfork(held.pid, held.pid, state):
                self._report(held, True)
            else:  # resumed by someone (SIGCONT): frozen again
                self._report(held, False)
                os.kill(held.pid, signal.SIGSTOP)
                held.ours = True
            return
        if all(stop is not None or self._in_vfork(held.pid, tid) for tid, stop
               in held.threads.items()):
            self._trace(held)  # threads made before the stop took
            if all(stop is not None or self._in_vfork(held.pid, tid) for tid, stop
                   in held.threads.items()):
                self._report(held, True)

    def _reap(self, held: _Held) -> None:
        """The stops and exits the held process's threads have reported."""
        for tid in list(held.threads):
            while True:
                try:
                    waited, status = os.waitpid(tid, os.WNOHANG | WALL)
                except ChildProcessError:  # gone, or no longer ours
                    del held.threads[tid]
                    break
                if waited == 0:
                    break
                if not os.WIFSTOPPED(status):
                    del held.threads[tid]
                    break
                # A signal-delivery stop holds a signal that came meanwhile, given back on
                # detach; an interrupt or a group stop, none.
                held.threads[tid] = 0 if status >> 16 == PTRACE_EVENT_STOP else \
                    os.WSTOPSIG(status)

    def _report(self, held: _Held, stopped: bool) -> None:
        if held.stopped != stopped:
            held.stopped = stopped
            self._on_stopped(held.pid, stopped)

    # -- reading /proc -------------------------------------------------------------------------

    def _tasks(self, pid: int) -> list[int]:
        try:
            return sorted(int(tid) for tid in os.listdir(f"{self._proc}/{pid}/task"))
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None

    def _in_vfork(self, pid: int, tid: int, state: str | None = None) -> bool:
        """Whether the thread waits in vfork() for its child (uninterruptibly: the kernel
        counts it as frozen)."""
        if (state or state_of(pid, tid, self._proc)) != "D":
            return False
        try:
            with open(f"{self._proc}/{pid}/task/{tid}/syscall", "rb") as f:
                call = f.read().split()
        except OSError:
            return False
        vfork, clone, clone3 = _VFORK_CALLS
        if not call or not call[0].isdigit():
            return False
        number = int(call[0])
        return number in (vfork, clone3) or (
            number == clone and len(call) > 1 and bool(int(call[1], 16) & CLONE_VFORK))
