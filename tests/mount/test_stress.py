"""A bounded stress test: many concurrent workers doing shell-level operations on one mount.

For ENCIDFS_STRESS_SECONDS seconds (default 20), threads and subprocesses work on one instance
with a small capacity (sev=24, sev_es=6, so that IDs are reused and refusals are frequent):

- holder workers (threads; two of them act through a bash process of their own) own a few
  `sleep` holders each: they move them between cgroups (cgroup.procs), allocate and free IDs
  for them through the control socket, kill them (SIGKILL or cgroup.kill of the worker's own
  cgroup /k<N>) and start new ones;
- tree workers (one in Python, one through bash) mkdir and rmdir cgroups at depths 1 to 3
  (the root's cgroup.max.descendants keeps the tree small, so mkdir meets EAGAIN);
- a settings worker writes encids.<T>.max (small values), enables and disables +encids (the
  root included) and writes cgroup.max.depth/.max.descendants;
- readers read every file: two threads, a bash `cat` loop and a Python process reading in
  5-byte pieces and polling the events files;
- a monitor samples the daemon's state throughout.

Everything is bookkept on the client side: the cgroups that exist, which css ("generation" of a
cgroup's encids state: each time the parent enables encids a new one starts) each ID was charged
to, the limits as set, the refusals and who holds which ID.  Limit writes and +/-encids (the
only operations that change what a charge lands on or may reach) exclude allocations and moves;
all the rest runs concurrently.  Checked:

- no operation fails with EIO or an errno it should not give (ENOENT/ENODEV only once the
  cgroup is gone, ENOENT from +encids only where the parent does not offer it, ...), every read
  shows a well-formed file, the daemon logs no traceback (conftest);
- every allocation is charged to its holder's cgroup, has fresh IDs of its type's range, and
  no ID is granted while a live holder still holds it; a refusal names a cgroup on the charge's
  path;
- at every sample (an atomic `status()`): no ID is held twice, every css's current equals the IDs
  charged to it and below (in-flight allocations included), and never exceeds its max except
  as much as it was already over when the limit was written (a lower limit is legal);
- at quiet points (workers paused), at the end, and once every holder is killed: the daemon's
  holders equal the client's bookkeeping, killed holders' IDs are freed, and every file agrees
  with the bookkeeping: the tree, encids.<T>.current/.max/.events, encids.<T>.stat, cgroup.procs,
  cgroup.events, cgroup.stat (dying descendants and dying csses included), the controllers;
- the daemon's RSS, after a warm-up and at the end, grows by less than 50 MiB.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import select
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mountutil import DEADLINE, keyed, read
from waiting import poll

from encidfs.client import Client, ControlError

SECONDS = float(os.environ.get("ENCIDFS_STRESS_SECONDS", "20"))
SEED = os.environ.get("ENCIDFS_STRESS_SEED") or os.urandom(4).hex()
CAPACITY = {"sev": 24, "sev_es": 6}
FIRST_ID = {"sev": 1, "sev_es": 25}  # the ranges follow one another
TYPES = tuple(CAPACITY)
ROOT_MAX_DESCENDANTS = 40
HOLDER_WORKERS = 4  # worker N owns the cgroup /kN (cgroup.kill kills only its own holders)
HOLDERS_EACH = 3
SPAWNS_EACH = 100  # holders a worker may start in all; kills stop after that
OPS_EACH = 100_000  # the loops are bounded in count as well as in time
QUIET_POINTS = 4  # during the run; then one at the end and one after killing every holder
LOCK_WAIT = 3 * DEADLINE
RSS_GROWTH_MAX = 50 * 2**20
GONE = ("ENOENT", "ENODEV")
LIMIT_TEXTS = {"0": 0, "1": 1, "2": 2, "3": 3, "5": 5, "0x4": 4, "010": 8, " 2 ": 2, "max": None}

Key = tuple[str, int]  # a css: its cgroup's path, and how often the parent had enabled encids

CORE_FILES = {"cgroup.procs", "cgroup.threads", "cgroup.controllers", "cgroup.subtree_control",
              "cgroup.max.descendants", "cgroup.max.depth", "cgroup.stat"}
NON_ROOT_FILES = {"cgroup.events", "cgroup.type", "cgroup.freeze", "cgroup.kill",
                  "cgroup.stat.local"}
ENCIDS_FILES = {f"encids.{t}.{kind}" for t in TYPES for kind in ("max", "current", "events")}
ROOT_STAT_FILES = {f"encids.{t}.stat" for t in TYPES}


# -- paths ---------------------------------------------------------------------------------------

def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def child_of(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def lineage(path: str) -> Iterator[str]:
    """path, then its ancestors up to the root."""
    while True:
        yield path
        if path == "/":
            return
        path = parent_of(path)


def below(path: str, top: str) -> bool:
    """path is top or in its subtree."""
    return top == "/" or path == top or path.startswith(top + "/")


def where(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def private(path: str) -> bool:
    """/kN and below belong to holder worker N."""
    return path != "/" and path.split("/")[1].startswith("k")


def errno_name(code: int | None) -> str:
    preferred = {errno.EAGAIN: "EAGAIN", errno.EOPNOTSUPP: "EOPNOTSUPP"}
    return preferred.get(code) or errno.errorcode.get(code or 0, str(code))


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# -- synchronisation -----------------------------------------------------------------------------

class RWLock:
    """Shared or exclusive, writers first; a wait past LOCK_WAIT fails the worker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def _wait(self, ready: Callable[[], bool]) -> None:
        if not self._cond.wait_for(ready, timeout=LOCK_WAIT):
            raise AssertionError(f"waited over {LOCK_WAIT} s for the {self.name} lock")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._wait(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._wait(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- the client-side model -----------------------------------------------------------------------

class Holder:
    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pid = process.pid
        self.cgroup = "/"  # only its owner moves it, so this is exact while it lives
        self.dead = False  # set by its owner before it kills it

    def exited(self) -> bool:
        """Exited (not reaped: its PID stays ours until the daemon has seen it go)."""
        try:
            return os.waitid(os.P_PID, self.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True


@dataclass(eq=False)
class Grant:
    holder: Holder
    type: str
    chain: tuple[Key, ...]  # the css charged, then its ancestors
    freeing: bool = False  # a free request is on its way


class Model:
    """What the client did and what therefore must be; guarded by `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = {"/"}
        self.removed: set[str] = set()
        self.enabled = {"/": False}  # encids in cgroup.subtree_control
        self.enables = {"/": 0}  # how many times it was enabled: the children's css generation
        self.limits: dict[tuple[Key, str], int] = {}  # absent: max
        self.tree_limits: dict[tuple[str, str], str] = {}  # (path, cgroup.max.*) -> text
        self.u0: dict[tuple[Key, str], int] = {}  # usage when limits were last written
        self.grants: dict[int, Grant] = {}
        self.refusals: Counter[tuple[tuple[Key, ...], str]] = Counter()
        self.holders: list[Holder] = []

    def css(self, path: str) -> Key | None:
        """The css whose files `path` shows, if its parent enables encids."""
        if path == "/":
            return ("/", 0)
        parent = parent_of(path)
        return (path, self.enables.get(parent, 0)) if self.enabled.get(parent) else None

    def chain(self, path: str) -> tuple[Key, ...]:
        """Where a process in `path` is charged (the nearest css) and that css's ancestors."""
        keys: list[Key] = []
        for node in lineage(path):
            key = self.css(node)
            if key is not None:
                keys.append(key)
            elif keys:
                raise AssertionError(f"the model has a css below {node}, which has none")
        return tuple(keys)

    def view(self) -> Model:
        """A copy to check a sample against, taken while enabling cannot change."""
        view = Model()
        view.live, view.removed = set(self.live), set(self.removed)
        view.enabled, view.enables = dict(self.enabled), dict(self.enables)
        view.limits, view.u0, view.grants = dict(self.limits), dict(self.u0), dict(self.grants)
        return view


# -- how operations are performed: system calls, or a bash process ------------------------------

class PyExec:
    name = "python"

    def mkdir(self, path: Path, mode: int) -> str:
        return _outcome(lambda: os.mkdir(path, mode))

    def rmdir(self, path: Path) -> str:
        return _outcome(lambda: os.rmdir(path))

    def write(self, path: Path, text: str) -> str:
        data = text.encode()

        def one_write() -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
            if written != len(data):
                raise AssertionError(f"short write to {path}: {written} of {len(data)}")

        return _outcome(one_write)

    def close(self) -> None:
        pass


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as error:
        return errno_name(error.errno)
    return "OK"


class ShellExec:
    """A bash process that runs one command at a time, as at a shell prompt; the errno is
    recognised from the error message."""

    name = "bash"
    KNOWN = ("EBUSY", "ENOENT", "ENODEV", "EEXIST", "EAGAIN", "EINVAL", "ESRCH", "EIO",
             "EACCES", "EPERM", "ENOTDIR", "ENOTEMPTY", "ERANGE", "E2BIG", "EOPNOTSUPP")

    def __init__(self, procs) -> None:
        self.process = subprocess.Popen(["bash", "--norc", "--noprofile", "-s"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        procs.started.append(self.process)  # killed and reaped in teardown whatever happens
        self.pending = b""

    def run(self, command: str) -> str:
        script = ("out=$( { " + command + " ; } 2>&1 >/dev/null ); "
                  "printf '__rc %d %s\\n' $? \"${out//$'\\n'/ }\"\n")
        assert self.process.stdin is not None
        self.process.stdin.write(script.encode())
        self.process.stdin.flush()
        line = self._line()
        _, rc, message = line.split(" ", 2)
        if rc == "0":
            return "OK"
        for name in self.KNOWN:
            if os.strerror(getattr(errno, name)) in message:
                return name
        return f"unrecognised ({command}: {message})"

    def _line(self) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + DEADLINE
        while b"\n" not in self.pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"bash gave no answer within {DEADLINE} s")
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError("bash exited")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode(errors="replace")

    def mkdir(self, path: Path, mode: int) -> str:
        return self.run(f"mkdir -m {mode:o} -- {shlex.quote(str(path))}")

    def rmdir(self, path: Path) -> str:
        return self.run(f"rmdir -- {shlex.quote(str(path))}")

    def write(self, path: Path, text: str) -> str:
        return self.run(f"echo {shlex.quote(text)} > {shlex.quote(str(path))}")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=DEADLINE)


# -- what a read may show ------------------------------------------------------------------------

def content_problem(name: str, text: str) -> str | None:
    """Why `text` is not a well-formed rendering of the file `name`, or None."""
    lines = text.splitlines()
    one_number = len(lines) == 1 and lines[0].isdigit()
    try:
        if text and not text.endswith("\n"):
            ok = False
        elif name in ("cgroup.procs", "cgroup.threads"):
            ok = all(line.isdigit() for line in lines)
        elif name in ("cgroup.controllers", "cgroup.subtree_control"):
            ok = text in ("", "encids\n")
        elif name == "cgroup.type":
            ok = text == "domain\n"
        elif name == "cgroup.freeze":
            ok = text == "0\n"
        elif name == "cgroup.stat.local":
            ok = text == "frozen_usec 0\n"  # nothing freezes here
        elif name in ("cgroup.max.depth", "cgroup.max.descendants") or name.endswith(".max"):
            ok = one_number or text == "max\n"
        elif name == "cgroup.events":
            values = keyed(text)
            ok = set(values) == {"populated", "frozen"} and set(values.values()) <= {0, 1}
        elif name == "cgroup.stat":
            ok = set(keyed(text)) == {"nr_descendants", "nr_subsys_encids",
                                      "nr_dying_descendants", "nr_dying_subsys_encids"}
        elif name.endswith(".current"):
            ok = one_number
        elif name.endswith(".events"):
            ok = len(lines) == 1 and lines[0].startswith("max ") and lines[0][4:].isdigit()
        elif name.endswith(".stat"):
            values = keyed(text)
            total = CAPACITY[name.split(".")[1]]
            ok = set(values) == {"total", "used"} and values["total"] == total \
                and 0 <= values["used"] <= total
        else:
            return f"unknown file {name}"
    except (ValueError, KeyError):
        ok = False
    return None if ok else f"{name} reads {text!r}"


BASH_READER = r"""
mnt=$1; stop=$2; end=$((SECONDS + $3)); n=0
while (( SECONDS < end && n < 1000000 )) && [[ ! -e $stop ]]; do
  while IFS= read -r -d '' f; do
    [[ -e $stop ]] && break
    cat -- "$f" > /dev/null && n=$((n + 1))
  done < <(find "$mnt" -type f -print0 2>/dev/null)
done
echo "$n"
"""

PY_READER = r"""
import errno, json, os, select, sys, time
mnt, stop, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
reads, errnos, unexpected = 0, {}, []

def note(code, path, allowed):
    name = errno.errorcode.get(code, str(code))
    errnos[name] = errnos.get(name, 0) + 1
    if name not in allowed:
        unexpected.append(f"{path}: {name}")

while time.monotonic() < end and reads < 1000000 and not os.path.exists(stop):
    for top, dirs, files in os.walk(mnt, onerror=lambda e: note(e.errno, e.filename, ("ENOENT",))):
        for name in files:
            path = os.path.join(top, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                note(e.errno, path, ("ENOENT", "ENODEV"))
                continue
            try:
                if name.endswith("events"):
                    poller = select.poll()
                    poller.register(fd, select.POLLPRI)
                    poller.poll(0)
                data = b""
                while chunk := os.read(fd, 5):
                    data += chunk
                if data and not data.endswith(b"\n"):
                    unexpected.append(f"{path}: read {data!r}")
                reads += 1
            except OSError as e:
                note(e.errno, path, ("ENOENT", "ENODEV", "EINVAL") if name == "cgroup.kill"
                     else ("ENOENT", "ENODEV"))
            finally:
                os.close(fd)
        if os.path.exists(stop):
            break
print(json.dumps({"reads": reads, "errnos": errnos, "unexpected": unexpected[:20]}))
"""


# -- the stress run ------------------------------------------------------------------------------

class Stress:
    def __init__(self, mnt: Path, procs, tmp_path: Path) -> None:
        self.mnt = mnt
        self.procs = procs
        self.tmp_path = tmp_path
        self.model = Model()
        self.pause = RWLock("pause")  # every state-changing operation; a quiet point excludes them
        # Allocations, moves and samples share it; limit writes and +/-encids exclude them.
        self.settings = RWLock("settings")
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.counters: list[Counter] = []
        self.names = itertools.count()
        self.threads: list[threading.Thread] = []
        self.end = time.monotonic() + SECONDS
        self.samples = 0
        self.rss_peak = 0
        self.daemon_pid = int(os.getxattr(mnt, "user.encidfs.pid"))

    # -- helpers ----------------------------------------------------------------------------------

    def dir(self, path: str) -> Path:
        return self.mnt / path.lstrip("/")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.stop.set()

    def counter(self) -> Counter:
        counter: Counter = Counter()
        self.counters.append(counter)
        return counter

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.end

    def gone(self, path: str) -> bool:
        """The cgroup is gone, or going: names are never reused, so it cannot come back; but
        the daemon answers others (ENODEV) while the rmdir waits for its reply to go out, and
        until then the kernel still has the entry: poll a little for it to go."""
        return poll(lambda: not self.dir(path).is_dir(), timeout=2.0)

    def expect(self, counter: Counter, op: str, result: str, allowed: set[str],
               path: str, what: str) -> None:
        """Count the outcome; fail on one not allowed, and on ENOENT/ENODEV from a cgroup that
        still exists."""
        counter[(op, result)] += 1
        if result == "OK" or (result in allowed and (result not in GONE or self.gone(path))):
            return
        self.problem(f"{what}: {result}" + (" though the cgroup exists" if result in GONE
                                            and result in allowed else ""))

    def connect(self) -> Client:
        client = Client.connect(mount=str(self.mnt))
        client._sock.settimeout(DEADLINE)  # a daemon that stops answering fails, not hangs
        return client

    def spawn(self) -> Holder:
        holder = Holder(self.procs.start(["sleep", str(int(SECONDS) + 600)]))
        with self.model.lock:
            self.model.holders.append(holder)
        return holder

    def start(self, name: str, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException:
                self.problem(f"{name} failed:\n{traceback.format_exc()}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        m = self.model
        ops = PyExec()
        assert ops.write(self.dir("/") / "cgroup.subtree_control", "+encids") == "OK"
        m.enabled["/"], m.enables["/"] = True, 1
        assert ops.write(self.dir("/") / "cgroup.max.descendants",
                         str(ROOT_MAX_DESCENDANTS)) == "OK"
        m.tree_limits[("/", "cgroup.max.descendants")] = str(ROOT_MAX_DESCENDANTS)
        for n in range(HOLDER_WORKERS):
            assert ops.mkdir(self.dir(f"/k{n}"), 0o755) == "OK"
            m.live.add(f"/k{n}")
            m.enabled[f"/k{n}"], m.enables[f"/k{n}"] = False, 0

    # -- holder workers ---------------------------------------------------------------------------

    def holder_worker(self, n: int, ops: PyExec | ShellExec) -> None:
        rng = random.Random(f"{SEED}-holders-{n}")
        counter = self.counter()
        own = f"/k{n}"
        holders = [self.spawn() for _ in range(HOLDERS_EACH)]
        spawns = HOLDERS_EACH
        with self.connect() as client:
            for _ in range(OPS_EACH):
                if not self.running():
                    break
                with self.pause.shared():
                    index = rng.randrange(len(holders))
                    holder = holders[index]
                    op = rng.choices(("move", "allocate", "free", "kill", "kill-cgroup"),
                                     (30, 35, 25, 2, 2))[0]
                    if op.startswith("kill") and spawns >= SPAWNS_EACH:
                        op = "move"
                    if op == "free" and not self.held_by(holder):
                        op = "allocate"
                    if op == "kill-cgroup" and holder.cgroup != own:
                        op = "move-own"
                    if op.startswith("move"):
                        self.move(rng, counter, ops, holder, own, op == "move-own")
                    elif op == "allocate":
                        self.allocate(rng, counter, client, holder)
                    elif op == "free":
                        self.free(rng, counter, client, holder)
                    elif op == "kill":
                        with self.model.lock:
                            holder.dead = True
                            counter[("IDs freed", "by exit")] += self.holding(holder)
                        holder.process.kill()
                        counter[("kill", "OK")] += 1
                        holders[index] = self.spawn()
                        spawns += 1
                    else:
                        with self.model.lock:
                            victims = [h for h in holders if h.cgroup == own]
                            for victim in victims:
                                victim.dead = True
                                counter[("IDs freed", "by exit")] += self.holding(victim)
                        result = ops.write(self.dir(own) / "cgroup.kill", "1")
                        self.expect(counter, "cgroup.kill", result, set(), own,
                                    f"{ops.name}: kill {own}")
                        for i, h in enumerate(holders):
                            if h in victims:
                                holders[i] = self.spawn()
                                spawns += 1

    def holding(self, holder: Holder) -> int:
        """How many IDs it holds; with the model's lock held."""
        return sum(g.holder is holder for g in self.model.grants.values())

    def held_by(self, holder: Holder) -> dict[int, Grant]:
        with self.model.lock:
            return {i: g for i, g in self.model.grants.items() if g.holder is holder}

    def move(self, rng: random.Random, counter: Counter, ops: PyExec | ShellExec,
             holder: Holder, own: str, home: bool) -> None:
        """To a random cgroup (not another worker's /kN), or to the worker's own /kN."""
        m = self.model
        with self.settings.shared():  # whether the target enables encids cannot change
            with m.lock:
                targets = sorted(p for p in m.live if not private(p) or p == own)
            target = own if home else rng.choice(targets)
            result = ops.write(self.dir(target) / "cgroup.procs", str(holder.pid))
            with m.lock:
                if result == "OK":
                    holder.cgroup = target
                busy = target != "/" and m.enabled.get(target, False)
            what = f"{ops.name}: move {holder.pid} to {target}"
            if busy and result == "OK":
                self.problem(f"{what}: accepted though {target} enables encids")
            self.expect(counter, "move", result, {"EBUSY", *GONE} if busy else set(GONE),
                        target, what)

    def allocate(self, rng: random.Random, counter: Counter, client: Client,
                 holder: Holder) -> None:
        m = self.model
        type_name = rng.choices(TYPES, (4, 1))[0]
        count = rng.choice((1, 1, 2, 3))
        what = f"allocate {count} {type_name} for {holder.pid} in {holder.cgroup}"
        with self.settings.shared():  # the css the charge lands on cannot change meanwhile
            try:
                ids = client.allocate(type_name, count, pid=holder.pid)
            except ControlError as error:
                name = errno_name(error.errno)
                counter[("allocate", name)] += 1
                with m.lock:
                    on_path = [key[0] for key in m.chain(holder.cgroup)]
                    if name == "EBUSY" and error.cgroup in on_path:
                        m.refusals[(m.chain(error.cgroup), type_name)] += 1
                        return
                self.problem(f"{what}: {name} ({error}, cgroup {error.cgroup})")
                return
            counter[("allocate", "OK")] += 1
            counter[("IDs granted", type_name)] += len(ids)
            first, total = FIRST_ID[type_name], CAPACITY[type_name]
            if (len(ids) != count or len(set(ids)) != count
                    or not all(first <= i < first + total for i in ids)):
                self.problem(f"{what}: got {ids}")
            if ids.cgroup != holder.cgroup:
                self.problem(f"{what}: charged to {ids.cgroup}")
            with m.lock:
                chain = m.chain(holder.cgroup)
                for i in ids:
                    before = m.grants.get(i)
                    if before is not None and not before.freeing and not before.holder.dead:
                        self.problem(f"{what}: ID {i} granted while {before.holder.pid} "
                                     f"(alive: {not before.holder.exited()}) holds it")
                    m.grants[i] = Grant(holder, type_name, chain)

    def free(self, rng: random.Random, counter: Counter, client: Client,
             holder: Holder) -> None:
        held = self.held_by(holder)
        ids = rng.sample(sorted(held), rng.randint(1, len(held)))
        with self.model.lock:
            for i in ids:
                held[i].freeing = True
        try:
            client.free(ids, pid=holder.pid)
        except ControlError as error:
            counter[("free", errno_name(error.errno))] += 1
            self.problem(f"free {ids} of live holder {holder.pid}: {error}")
            return
        counter[("free", "OK")] += 1
        counter[("IDs freed", "by request")] += len(ids)
        with self.model.lock:
            for i in ids:
                if self.model.grants.get(i) is held[i]:
                    del self.model.grants[i]

    # -- tree workers -----------------------------------------------------------------------------

    def tree_worker(self, n: int, ops: PyExec | ShellExec) -> None:
        rng = random.Random(f"{SEED}-tree-{n}")
        counter = self.counter()
        m = self.model
        for _ in range(OPS_EACH):
            if not self.running():
                break
            with self.pause.shared():
                with m.lock:
                    public = sorted(p for p in m.live if not private(p))
                if rng.random() < 0.55:
                    parent = rng.choice([p for p in public if depth(p) <= 2])
                    path = child_of(parent, f"c{next(self.names)}")
                    result = ops.mkdir(self.dir(path), rng.choice((0o755, 0o700, 0o775)))
                    if result == "OK":
                        with m.lock:
                            m.live.add(path)
                            m.enabled[path], m.enables[path] = False, 0
                    self.expect(counter, f"mkdir depth {depth(path)}", result,
                                {"EAGAIN", *GONE}, parent, f"{ops.name}: mkdir {path}")
                else:
                    candidates = [p for p in public if p != "/"]
                    if not candidates:
                        continue
                    path = rng.choice(candidates)
                    result = ops.rmdir(self.dir(path))
                    if result == "OK":
                        with m.lock:
                            m.live.discard(path)
                            m.removed.add(path)
                    self.expect(counter, f"rmdir depth {depth(path)}", result,
                                {"EBUSY", "ENOENT"}, path, f"{ops.name}: rmdir {path}")

    # -- the settings worker ----------------------------------------------------------------------

    def settings_worker(self, executors: list[PyExec | ShellExec]) -> None:
        rng = random.Random(f"{SEED}-settings")
        counter = self.counter()
        with self.connect() as client:
            for _ in range(OPS_EACH):
                if not self.running():
                    break
                with self.pause.shared(), self.settings.exclusive():
                    for _ in range(rng.randint(1, 4)):
                        ops = rng.choice(executors)
                        action = rng.choices(("limit", "toggle", "tree"), (6, 2, 1))[0]
                        getattr(self, f"set_{action}")(rng, counter, ops)
                    self.take_u0(client)
                self.stop.wait(rng.uniform(0.01, 0.06))  # pacing, not waiting for the daemon

    def set_limit(self, rng: random.Random, counter: Counter, ops: PyExec | ShellExec) -> None:
        m = self.model
        with m.lock:
            candidates = sorted((p, m.css(p)) for p in m.live if p != "/" and m.css(p))
        if not candidates:
            return
        path, key = rng.choice(candidates)
        type_name = rng.choices(TYPES, (3, 1))[0]
        text = rng.choice(list(LIMIT_TEXTS))
        result = ops.write(self.dir(path) / f"encids.{type_name}.max", text)
        if result == "OK":
            with m.lock:
                if LIMIT_TEXTS[text] is None:
                    m.limits.pop((key, type_name), None)
                else:
                    m.limits[(key, type_name)] = LIMIT_TEXTS[text]
        self.expect(counter, "limit", result, set(GONE), path,
                    f"{ops.name}: {text!r} > {path}/encids.{type_name}.max")

    def set_toggle(self, rng: random.Random, counter: Counter, ops: PyExec | ShellExec) -> None:
        m = self.model
        with m.lock:
            path = rng.choice(sorted(p for p in m.live if not private(p)))
            enable = not m.enabled[path]
            offered = path == "/" or m.enabled.get(parent_of(path), False)
        text = "+encids" if enable else "-encids"
        result = ops.write(self.dir(path) / "cgroup.subtree_control", text)
        what = f"{ops.name}: {text} > {path}/cgroup.subtree_control"
        if result == "OK":
            with m.lock:
                m.enabled[path] = enable
                m.enables[path] += enable
            if enable and not offered:
                self.problem(f"{what}: accepted though the parent does not offer encids")
        if enable and not offered and result == "ENOENT":
            counter[("+encids unoffered", result)] += 1
            return
        self.expect(counter, "+encids" if enable else "-encids", result, {"EBUSY", *GONE},
                    path, what)

    def set_tree(self, rng: random.Random, counter: Counter, ops: PyExec | ShellExec) -> None:
        m = self.model
        with m.lock:
            path = rng.choice(sorted(p for p in m.live if p != "/"))
        name = rng.choice(("cgroup.max.depth", "cgroup.max.descendants"))
        text = rng.choice(("max", "max", "1", "2", "3", "6"))
        result = ops.write(self.dir(path) / name, text)
        if result == "OK":
            with m.lock:
                m.tree_limits[(path, name)] = text
        self.expect(counter, "cgroup.max.*", result, set(GONE), path,
                    f"{ops.name}: {text} > {path}/{name}")

    def take_u0(self, client: Client) -> None:
        """Usage as the new limits start: from now on no css may go over max(limit, this)."""
        status = client.status()
        m = self.model
        with m.lock:
            u0 = {}
            for entry in status["cgroups"]:
                key = m.css(entry["path"])
                if ("encids" in entry) != (key is not None):
                    self.problem(f"status shows encids for {entry['path']}: {'encids' in entry}")
                    continue
                for type_name, values in entry.get("encids", {}).items():
                    u0[(key, type_name)] = values["current"]
            m.u0 = u0

    # -- readers ----------------------------------------------------------------------------------

    def reader(self, n: int) -> None:
        rng = random.Random(f"{SEED}-reader-{n}")
        counter = self.counter()
        for _ in range(OPS_EACH):
            if not self.running():
                break
            with self.model.lock:
                path = rng.choice(sorted(self.model.live))
            try:
                with os.scandir(self.dir(path)) as entries:
                    names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError as error:
                self.expect(counter, "readdir", errno_name(error.errno), set(GONE), path,
                            f"readdir {path}")
                continue
            counter[("readdir", "OK")] += 1
            for name, is_dir in names:
                file = self.dir(path) / name
                if is_dir:
                    continue
                try:
                    text = read(file)
                except OSError as error:
                    result = errno_name(error.errno)
                    counter[("read", result)] += 1
                    if not (result in GONE or (name == "cgroup.kill" and result == "EINVAL")):
                        self.problem(f"read {where(path, name)}: {result}")
                    continue
                counter[("read", "OK")] += 1
                if name == "cgroup.kill":
                    self.problem(f"read {path}/cgroup.kill gave {text!r}")
                elif (trouble := content_problem(name, text)) is not None:
                    self.problem(f"read {where(path, trouble)}")
            if path == "/":
                pid = os.getxattr(self.mnt, "user.encidfs.pid").decode()
                if int(pid) != self.daemon_pid:
                    self.problem(f"user.encidfs.pid changed to {pid}")

    def start_subprocess_readers(self) -> list[subprocess.Popen]:
        stop_file = self.tmp_path / "stop-readers"
        seconds = str(int(SECONDS) + 5)
        bash = self.procs.start(["bash", "-c", BASH_READER, "reader", str(self.mnt),
                                 str(stop_file), seconds],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        python = self.procs.start([sys.executable, "-c", PY_READER, str(self.mnt),
                                   str(stop_file), seconds],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return [bash, python]

    def stop_subprocess_readers(self, readers: list[subprocess.Popen]) -> dict[str, int]:
        (self.tmp_path / "stop-readers").touch()
        reads = {}
        for name, process in zip(("bash cat", "python 5-byte reads"), readers):
            out, err = process.communicate(timeout=DEADLINE)
            if process.returncode != 0:
                self.problem(f"{name} reader exited {process.returncode}: {err}")
                continue
            if name == "bash cat":
                reads[name] = int(out)
                allowed = [os.strerror(errno.ENOENT), os.strerror(errno.ENODEV)]
                for line in err.splitlines():
                    if not (any(line.endswith(": " + text) for text in allowed)
                            or (line.endswith("/cgroup.kill: " + os.strerror(errno.EINVAL)))):
                        self.problem(f"bash reader: {line}")
            else:
                summary = json.loads(out)
                reads[name] = summary["reads"]
                for line in summary["unexpected"]:
                    self.problem(f"python reader: {line}")
        return reads

    # -- the monitor ------------------------------------------------------------------------------

    def monitor(self) -> None:
        rng = random.Random(f"{SEED}-monitor")
        counter = self.counter()
        with self.connect() as client:
            while self.running():
                with self.settings.shared():
                    # The copy first: an ID it does not show as the status does was granted
                    # since, so within this shared section, to the css of now.
                    with self.model.lock:
                        view = self.model.view()
                    status = client.status()
                    for trouble in self.sample_problems(status, view):
                        self.problem(f"sample: {trouble}")
                    self.sample_files(rng, counter, view)
                self.samples += 1
                self.rss_peak = max(self.rss_peak, vm_rss(self.daemon_pid))
                self.stop.wait(0.05)  # pacing

    def sample_problems(self, status: dict, view: Model) -> list[str]:
        """An atomic status against the model: usage exact, limits obeyed."""
        out = []
        usage: Counter[tuple[Key, str]] = Counter()
        seen: set[int] = set()
        for entry in status["holders"]:
            for i in entry["ids"]:
                if i in seen:
                    out.append(f"ID {i} is held twice")
                seen.add(i)
                grant = view.grants.get(i)
                charged = entry["charged"]["encids"]
                if (grant is not None and grant.holder.pid == entry["pid"]
                        and grant.type == entry["type"] and grant.chain[0][0] == charged):
                    chain = grant.chain
                else:  # an allocation whose reply is on its way: charged to the css of now
                    chain = view.chain(charged)
                    if chain[0][0] != charged:
                        out.append(f"ID {i} charged to {charged}, which has no css")
                for key in chain:
                    usage[(key, entry["type"])] += 1
        for entry in status["cgroups"]:
            key = view.css(entry["path"])
            if ("encids" in entry) != (key is not None):
                out.append(f"{entry['path']} has encids: {'encids' in entry}, model: {key}")
                continue
            for type_name, values in entry.get("encids", {}).items():
                where = f"{entry['path']} {type_name}"
                limit = view.limits.get((key, type_name))
                current = values["current"]
                if values["max"] != ("max" if limit is None else limit):
                    out.append(f"{where}: max {values['max']}, set {limit}")
                if current != usage[(key, type_name)]:
                    out.append(f"{where}: current {current}, "
                               f"IDs charged there and below {usage[(key, type_name)]}")
                if limit is not None and current > max(limit, view.u0.get((key, type_name), 0)):
                    out.append(f"{where}: current {current} over max {limit} (it was "
                               f"{view.u0.get((key, type_name), 0)} when limits were set)")
                if current > CAPACITY[type_name]:
                    out.append(f"{where}: current {current} over the capacity")
        return out

    def sample_files(self, rng: random.Random, counter: Counter, view: Model) -> None:
        """Some cgroups' encids files: current within max(limit, usage when it was set)."""
        for t in TYPES:
            trouble = content_problem(f"encids.{t}.stat", read(self.mnt / f"encids.{t}.stat"))
            if trouble is not None:  # it checks used <= total
                self.problem(trouble)
        paths = sorted(view.live)
        for path in rng.sample(paths, min(6, len(paths))):
            key = view.css(path)
            if path == "/" or key is None:
                continue
            for t in TYPES:
                try:
                    current = int(read(self.dir(path) / f"encids.{t}.current"))
                except OSError as error:
                    self.expect(counter, "sample read", errno_name(error.errno), set(GONE),
                                path, f"read {path}/encids.{t}.current")
                    continue
                counter[("sample read", "OK")] += 1
                limit = view.limits.get((key, t))
                if limit is not None and current > max(limit, view.u0.get((key, t), 0)):
                    self.problem(f"{path}/encids.{t}.current reads {current}, over max {limit}")

    # -- quiet points -----------------------------------------------------------------------------

    def quiet_point(self, client: Client, what: str) -> float:
        """With every worker paused: poll until the daemon agrees with the bookkeeping in every
        respect (killed holders' exits take a moment), then reap the killed holders."""
        started = time.monotonic()
        patience = 1.0 if self.problems else DEADLINE  # a failed run need not wait long
        with self.pause.exclusive():
            deadline = time.monotonic() + patience
            delay = 0.002
            while True:
                troubles = self.consistency_problems(client)
                if not troubles:
                    break
                if time.monotonic() > deadline:
                    self.problem(f"{what}: after {patience} s still:\n  " +
                                 "\n  ".join(troubles[:25]))
                    break
                time.sleep(delay)  # polling the daemon, within a deadline
                delay = min(delay * 2, 0.05)
            m = self.model
            with m.lock:
                if not troubles:
                    for holder in m.holders:
                        if holder.dead:
                            holder.process.wait(timeout=DEADLINE)
                    m.grants = {i: g for i, g in m.grants.items() if not g.holder.dead}
                    m.holders = [h for h in m.holders if not h.dead]
        return time.monotonic() - started

    def walk(self) -> dict[str, set[str]]:
        """Every cgroup by readdir, with the names of its files."""
        found: dict[str, set[str]] = {}
        stack = ["/"]
        while stack:
            path = stack.pop()
            files = set()
            with os.scandir(self.dir(path)) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(child_of(path, entry.name))
                    else:
                        files.add(entry.name)
            found[path] = files
        return found

    def consistency_problems(self, client: Client) -> list[str]:
        out: list[str] = []
        status = client.status()
        m = self.model
        with m.lock:
            alive = [h for h in m.holders if not h.dead]
            for h in m.holders:
                if h.dead and not h.exited():
                    out.append(f"holder {h.pid} was killed but has not exited yet")
                elif not h.dead and h.exited():
                    out.append(f"holder {h.pid} exited though nobody killed it")
            grants = {i: g for i, g in m.grants.items() if not g.holder.dead}

            # Who holds what: the daemon against the client.
            daemon: dict[int, tuple[int, str, str]] = {}
            for entry in status["holders"]:
                for i in entry["ids"]:
                    if i in daemon:
                        out.append(f"ID {i} is held twice")
                    daemon[i] = (entry["pid"], entry["type"], entry["charged"]["encids"])
            client_side = {i: (g.holder.pid, g.type, g.chain[0][0]) for i, g in grants.items()}
            if daemon != client_side:
                out.append("holdings (ID: pid, type, cgroup) only the daemon has: "
                           f"{sorted(set(daemon.items()) - set(client_side.items()))[:8]}, "
                           f"only the client: "
                           f"{sorted(set(client_side.items()) - set(daemon.items()))[:8]}")

            # What must show where.
            usage: Counter[tuple[Key, str]] = Counter()
            pinned: set[Key] = set()  # csses with charges at or below them: not released
            for g in grants.values():
                for key in g.chain:
                    usage[(key, g.type)] += 1
                    pinned.add(key)
            events: Counter[tuple[Key, str]] = Counter()
            for (chain, type_name), count in m.refusals.items():
                for key in chain:
                    events[(key, type_name)] += count
            dying = {key[0] for key in pinned if key[0] in m.removed}
            offline = {key for key in pinned if key[0] in m.removed or m.css(key[0]) != key}

            def populated(path: str) -> bool:
                return any(h.cgroup != "/" and below(h.cgroup, path) for h in alive)

            def limit_text(key: Key, type_name: str) -> str:
                limit = m.limits.get((key, type_name))
                return "max" if limit is None else str(limit)

            # The daemon's own report.
            reported = {entry["path"]: entry for entry in status["cgroups"]}
            if set(reported) != m.live:
                out.append(f"status lists {sorted(set(reported) ^ m.live)} contrary to the model")
            for path, entry in reported.items():
                key = m.css(path)
                members = sorted(h.pid for h in alive if h.cgroup == path and path != "/")
                if entry["procs"] != members:
                    out.append(f"status: {path} has procs {entry['procs']}, expected {members}")
                if entry["populated"] != populated(path):
                    out.append(f"status: {path} populated {entry['populated']}")
                if ("encids" in entry) != (key is not None):
                    out.append(f"status: {path} has encids {'encids' in entry}, model {key}")
                    continue
                for type_name, values in entry.get("encids", {}).items():
                    expected = (usage[(key, type_name)], limit_text(key, type_name),
                                events[(key, type_name)])
                    got = (values["current"], str(values["max"]), values["events"])
                    if got != expected:
                        out.append(f"status: {path} {type_name} (current, max, events) {got}, "
                                   f"expected {expected}")

            # The files.
            try:
                tree = self.walk()
            except OSError as error:
                return out + [f"walking the tree: {error}"]
            if set(tree) != m.live:
                out.append(f"the tree has {sorted(set(tree) ^ m.live)} contrary to the model")
            for path in sorted(set(tree) & m.live):
                key = m.css(path)
                names = set(CORE_FILES)
                names |= ROOT_STAT_FILES if path == "/" else NON_ROOT_FILES
                names |= ENCIDS_FILES if key is not None and path != "/" else set()
                if tree[path] != names:
                    out.append(f"{path} lists {sorted(tree[path] ^ names)} contrary to the model")
                offered = path == "/" or m.enabled[parent_of(path)]
                descendants = [p for p in m.live if p != path and below(p, path)]
                expected_files = {
                    "cgroup.subtree_control": "encids\n" if m.enabled[path] else "",
                    "cgroup.controllers": "encids\n" if offered else "",
                    "cgroup.max.depth":
                        m.tree_limits.get((path, "cgroup.max.depth"), "max") + "\n",
                    "cgroup.max.descendants":
                        m.tree_limits.get((path, "cgroup.max.descendants"), "max") + "\n",
                    "cgroup.stat": (
                        f"nr_descendants {len(descendants)}\n"
                        f"nr_subsys_encids "
                        f"{1 + sum(m.css(p) is not None for p in descendants) if key else 0}\n"
                        f"nr_dying_descendants "
                        f"{sum(p != path and below(p, path) for p in dying)}\n"
                        f"nr_dying_subsys_encids "
                        f"{sum(below(k[0], path) for k in offline)}\n"),
                }
                if path == "/":
                    for t in TYPES:
                        expected_files[f"encids.{t}.stat"] = (
                            f"total {CAPACITY[t]}\nused {usage[(key, t)]}\n")
                else:
                    members = sorted(h.pid for h in alive if h.cgroup == path)
                    expected_files["cgroup.procs"] = "".join(f"{pid}\n" for pid in members)
                    expected_files["cgroup.events"] = (
                        f"populated {int(populated(path))}\nfrozen 0\n")
                    if key is not None:
                        for t in TYPES:
                            expected_files[f"encids.{t}.current"] = f"{usage[(key, t)]}\n"
                            expected_files[f"encids.{t}.max"] = limit_text(key, t) + "\n"
                            expected_files[f"encids.{t}.events"] = f"max {events[(key, t)]}\n"
                for name, expected in expected_files.items():
                    try:
                        text = read(self.dir(path) / name)
                    except OSError as error:
                        out.append(f"read {where(path, name)}: {errno_name(error.errno)}")
                        continue
                    if text != expected:
                        out.append(f"{where(path, name)} reads {text!r}, expected {expected!r}")
            root_pids = set(map(int, read(self.mnt / "cgroup.procs").split()))
            for h in alive:
                if (h.pid in root_pids) != (h.cgroup == "/"):
                    out.append(f"/cgroup.procs: holder {h.pid} in {h.cgroup}")
        return out

    # -- the run ----------------------------------------------------------------------------------

    def report(self, figures: dict[str, object]) -> None:
        totals: Counter = Counter()
        for counter in self.counters:
            totals.update(counter)
        ops = sum(count for (op, _), count in totals.items() if not op.startswith("IDs "))
        print(f"\nencidfs stress (seed {SEED}, {SECONDS:g} s):")
        for name, value in figures.items():
            print(f"  {name}: {value}")
        print(f"  operations by the threads: {ops}")
        for (op, result), count in sorted(totals.items()):
            print(f"    {op:<20} {result:<10} {count}")


@pytest.mark.slow
def test_concurrent_shell_level_operations_keep_the_accounting_exact(mount_encidfs, procs,
                                                                     tmp_path):
    started = time.monotonic()
    # The model keeps one controller's books: the mount offers that one.
    mnt = mount_encidfs("--controllers", "encids",
                        *(arg for t, n in CAPACITY.items() for arg in ("--capacity", f"{t}={n}")))
    stress = Stress(mnt, procs, tmp_path)
    stress.setup()
    shells = [ShellExec(procs) for _ in range(4)]  # one per thread that uses one
    readers = stress.start_subprocess_readers()
    for n in range(HOLDER_WORKERS):
        ops = shells[n - 2] if n >= 2 else PyExec()
        stress.start(f"holders-{n}", lambda n=n, ops=ops: stress.holder_worker(n, ops))
    stress.start("tree-0", lambda: stress.tree_worker(0, PyExec()))
    stress.start("tree-1", lambda: stress.tree_worker(1, shells[2]))
    stress.start("settings", lambda: stress.settings_worker([PyExec(), shells[3]]))
    for n in range(2):
        stress.start(f"reader-{n}", lambda n=n: stress.reader(n))
    stress.start("monitor", stress.monitor)

    figures: dict[str, object] = {}
    quiet_times = []
    with stress.connect() as client:
        for point in range(1, QUIET_POINTS + 1):
            at = stress.end - SECONDS + SECONDS * point / (QUIET_POINTS + 1)
            if stress.stop.wait(max(0.0, at - time.monotonic())):
                break  # a problem: stop early
            quiet_times.append(stress.quiet_point(client, f"quiet point {point}"))
            if point == 1:
                figures["daemon RSS after warm-up (MiB)"] = vm_rss(stress.daemon_pid) / 2**20
        stress.stop.wait(max(0.0, stress.end - time.monotonic()))

        # Stop: the workers finish their operation in hand; the readers see their stop file.
        stress.stop.set()
        for thread in stress.threads:
            thread.join(timeout=LOCK_WAIT + DEADLINE)
            if thread.is_alive():
                stress.problem(f"{thread.name} did not stop")
        reads = stress.stop_subprocess_readers(readers)
        for shell in shells:
            shell.close()
        stress.end = time.monotonic()  # nothing runs any more

        # The end, with the surviving holders still holding their IDs.
        with stress.model.lock:
            live_ids = len([g for g in stress.model.grants.values() if not g.holder.dead])
            nr_cgroups = len(stress.model.live)
            nr_dying = len({k[0] for g in stress.model.grants.values() if not g.holder.dead
                            for k in g.chain if k[0] in stress.model.removed})
        quiet_times.append(stress.quiet_point(client, "the end"))

        # Then with every holder killed: everything is freed, every dying cgroup released.
        with stress.model.lock:
            holders = [h for h in stress.model.holders if not h.dead]
            for holder in holders:
                holder.dead = True
        for holder in holders:
            holder.process.kill()
        quiet_times.append(stress.quiet_point(client, "once every holder is killed"))

    rss_end = vm_rss(stress.daemon_pid)
    rss_warm = figures.get("daemon RSS after warm-up (MiB)")
    figures.update({
        "daemon RSS at the end (MiB)": rss_end / 2**20,
        "daemon RSS peak sampled (MiB)": stress.rss_peak / 2**20,
        "status samples": stress.samples,
        "quiet points (s each)": [round(t, 3) for t in quiet_times],
        "at the end: cgroups, IDs held, dying cgroups": (nr_cgroups, live_ids, nr_dying),
        "holders started": sum(1 for p in procs.started if p.args[0] == "sleep"),
        "subprocess reads": reads,
        "run time (s)": round(time.monotonic() - started, 1),
    })
    stress.report({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()})
    assert not stress.problems, "\n".join(stress.problems[:20])
    assert rss_warm is not None, "no warm-up RSS figure"
    growth = rss_end - rss_warm * 2**20
    assert growth < RSS_GROWTH_MAX, f"the daemon's RSS grew by {growth / 2**20:.1f} MiB"


def test_readdir_skips_a_cgroup_removed_since_opendir(mnt):
    """What the stress run meets now and then, made deterministic: opendir snapshots the
    entries; a child removed before readdir must be left out (or the listing end), not turn
    the readdir into EIO with a traceback in the daemon's log."""
    (mnt / "a" / "b").mkdir(parents=True)
    with os.scandir(mnt / "a") as entries:  # opendir(2): the daemon takes its snapshot
        (mnt / "a" / "b").rmdir()
        names = {entry.name for entry in entries}  # readdir(2)
    assert "b" not in names and "cgroup.procs" in names
