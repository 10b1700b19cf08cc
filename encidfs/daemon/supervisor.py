"""The supervisor: `encidfs mount` runs the daemon under it, and mounts again if it dies.

A daemon that dies (kill -9, the OOM killer, a bug) leaves a dead mount ("Transport endpoint is
not connected") for every tenant.  The supervisor starts a new daemon at once: it cleans up the
dead mount and mounts again at the same place, restoring the state from its journal.  A daemon
that exits with status 0 was unmounted (umount, SIGTERM): then the supervisor ends too.
SIGTERM and SIGINT to the supervisor are passed to the daemon, which unmounts cleanly.

The restarts so far, with why, reach each new daemon in $ENCIDFS_RESTARTS (for `status`), and
the supervisor's PID in $ENCIDFS_SUPERVISOR (the daemon never freezes or kills it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RESTARTS_ENV = "ENCIDFS_RESTARTS"
SUPERVISOR_ENV = "ENCIDFS_SUPERVISOR"
QUICK = 1.0  # seconds: a daemon that dies before it answers, or this soon after, died quickly
MAX_BACKOFF = 5.0  # seconds between starts of a daemon that keeps dying quickly (a crash loop)
# Signals whose default action would end the process (and every tenant's mount with it): the
# supervisor and the daemon log and ignore them.
STRAY_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
                 signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGXFSZ)


def restarts() -> list[dict]:
    """The restarts so far, as this daemon's supervisor told it: [{"time", "reason"}]."""
    try:
        return json.loads(os.environ.get(RESTARTS_ENV, "[]"))
    except ValueError:
        return []


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_ENV, "")
    return int(value) if value.isdigit() else None


def supervise(daemon_argv: list[str], ready: Callable[[], None]) -> int:
    """Run `daemon_argv --ready-fd N` until it ends cleanly; call ready() once the first one
    answers.  Return its exit status (the first one's, if it never got ready)."""
    child: subprocess.Popen | None = None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for signum in STRAY_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    history: list[dict] = []
    quick_deaths = 0
    first = True
    while True:
        child, got_ready = _start(daemon_argv, history)
        answering = time.monotonic()
        if got_ready and first:
            ready()
            first = False
        status = child.wait()
        if status == 0 or stopping:
            return status
        if first:
            return status  # it never mounted: the error is the caller's to see
        reason = _describe(status)
        history.append({"time": time.time(), "reason": reason})
        log.warning("the daemon %s: mounting again (restart %d)", reason, len(history))
        quick = not got_ready or time.monotonic() - answering < QUICK
        quick_deaths = quick_deaths + 1 if quick else 0
        if quick_deaths > 2:
            time.sleep(min(MAX_BACKOFF, 0.05 * 2 ** quick_deaths))


def _start(daemon_argv: list[str], history: list[dict]) -> tuple[subprocess.Popen, bool]:
    """Start a daemon and wait until it answers or gives up; return it and whether it is up."""
    read_end, write_end = os.pipe()
    env = {**os.environ, RESTARTS_ENV: json.dumps(history), SUPERVISOR_ENV: str(os.getpid())}
    child = subprocess.Popen([*daemon_argv, "--ready-fd", str(write_end)], pass_fds=[write_end],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as said:
        return child, said.read().strip() == b"ready"  # end of file when it gave up


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
