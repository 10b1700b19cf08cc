"""Chaos: mixed load on a supervised mount while its daemon is killed (kill -9) at random moments.

For ENCIDFS_CHAOS_SECONDS seconds (default 60), on `encidfs mount` as a user runs it (with its
supervisor and its default runtime journal) and a small capacity (sev=16, sev_es=4):

- a limits worker writes encids.<T>.max and misc.max of four cgroups;
- a tree worker makes and removes cgroups;
- holder workers move their `sleep` holders between two cgroups, allocate and free IDs for them
  through the control socket, kill them and start new ones;
- hostile clients send the control socket garbage, half requests and nothing at all;
- a delegatee (nobody, in a subtree chowned to it) makes and removes cgroups of its own.

Every change a worker saw acknowledged is written down; one whose request failed (the daemon
died under it) is unknown until the next check.  After each kill, once the mount answers again,
the workers pause and the mount is checked: every acknowledged change is there, no ID is held
twice, in each controller every cgroup's current equals the IDs its subtree's live holders
hold, and encids.<T>.stat's used is the sum.  What was unknown is then read back, and the run
goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mountutil import DEADLINE, keyed, read, wait_until, write

from encidfs.client import Client, ControlError
from encidfs.procs.procfs import read_stat

SECONDS = float(os.environ.get("ENCIDFS_CHAOS_SECONDS", "60"))
SEED = os.environ.get("ENCIDFS_CHAOS_SEED") or os.urandom(4).hex()
CAPACITY = {"sev": 16, "sev_es": 4}
NOBODY = 65534
LIMITED = [f"l{n}" for n in range(4)]
CONTROLLERS = ("encids", "misc")
TREE_NAMES = [f"n{n}" for n in range(8)]
HOMES = ("m0", "m1")  # where holders live
HOLDER_WORKERS, HOLDERS_EACH = 2, 2
UNKNOWN = object()  # a change whose request failed: it may or may not have happened

DELEGATEE = r"""
cd "$1" || exit 1
while true; do
    mkdir -p x/y 2>/dev/null; echo +encids > x/cgroup.subtree_control 2>/dev/null
    rmdir x/y x 2>/dev/null
done
"""


def limit_file(mnt: Path, key: tuple[str, str, str], value: str) -> tuple[Path, str]:
    """Where and what to write to set a limit: (cgroup, controller, type)."""
    cgroup, controller, type_name = key
    if controller == "misc":
        return mnt / cgroup / "misc.max", f"{type_name} {value}"
    return mnt / cgroup / f"encids.{type_name}.max", value


def read_limit(mnt: Path, key: tuple[str, str, str]) -> str:
    cgroup, controller, type_name = key
    if controller == "misc":
        return dict(line.split() for line in read(mnt / cgroup / "misc.max").splitlines())[
            type_name]
    return read(mnt / cgroup / f"encids.{type_name}.max").strip()


def ids_of(status: dict) -> dict[int, list[int]]:
    """holder -> its IDs, from a status reply."""
    held: dict[int, list[int]] = {}
    for entry in status["holders"]:
        held.setdefault(entry["pid"], []).extend(entry["ids"])
    return held


class Pauses:
    """Workers pause between operations when asked, so that the mount can be checked."""

    def __init__(self) -> None:
        self.wanted = threading.Event()
        self.resume = threading.Event()
        self.paused: set[str] = set()
        self.lock = threading.Lock()

    def point(self, name: str) -> None:
        if not self.wanted.is_set():
            return
        with self.lock:
            self.paused.add(name)
        self.resume.wait()
        with self.lock:
            self.paused.discard(name)

    @contextlib.contextmanager
    def all(self, names: set[str]) -> Iterator[None]:
        self.resume.clear()
        self.wanted.set()
        try:
            wait_until(lambda: self.paused >= names, "the workers to pause", 3 * DEADLINE)
            yield
        finally:
            self.wanted.clear()
            self.resume.set()


class Chaos:
    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.rng = random.Random(SEED)
        self.stop = threading.Event()
        self.pauses = Pauses()
        self.workers: dict[str, threading.Thread] = {}
        self.errors: list[str] = []
        self.counts: Counter = Counter()  # (operation, outcome)
        self.checks = 0
        self.limits: dict[tuple[str, str], object] = {}  # (cgroup, type) -> "max"/"5"/UNKNOWN
        self.tree: dict[str, object] = {name: False for name in TREE_NAMES}  # exists?
        self.homes: dict[int, object] = {}  # live holder -> its cgroup, or UNKNOWN
        self.held: dict[int, object] = {}  # live holder -> set of IDs, or UNKNOWN
        self.killed: set[int] = set()  # holders killed: their IDs must go
        self.processes: list[subprocess.Popen] = []
        self.starts: dict[int, int] = {}
        self.killed_at: dict[int, float] = {}

    def start(self, name: str, work: Callable[[random.Random], None]) -> None:
        rng = random.Random(f"{SEED}-{name}")

        def run() -> None:
            try:
                while not self.stop.is_set():
                    self.pauses.point(name)
                    work(rng)
            except Exception as error:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{name}: {type(error).__name__}: {error}")

        self.workers[name] = threading.Thread(target=run, name=name, daemon=True)
        self.workers[name].start()

    def attempt(self, what: str, action: Callable[[], object]) -> object:
        """The action's result; UNKNOWN if the daemon was gone (or went) meanwhile."""
        try:
            result = action()
        except (OSError, ConnectionError, ValueError) as error:
            self.counts[(what, type(error).__name__)] += 1
            time.sleep(0.005)  # as a client would, rather than spin on a dead mount
            return UNKNOWN
        self.counts[(what, "OK")] += 1
        return result

    # -- the workers --------------------------------------------------------------------------

    def limits_worker(self, rng: random.Random) -> None:
        key = (rng.choice(LIMITED), rng.choice(CONTROLLERS), rng.choice(list(CAPACITY)))
        value = rng.choice(["max", *map(str, range(0, 12))])
        done = self.attempt("limit", lambda: write(*limit_file(self.mnt, key, value)))
        self.limits[key] = value if done is not UNKNOWN else UNKNOWN

    def tree_worker(self, rng: random.Random) -> None:
        name = rng.choice(TREE_NAMES)
        path = self.mnt / "t" / name
        if self.tree[name] is True:
            done = self.attempt("rmdir", lambda: os.rmdir(path))
            self.tree[name] = False if done is not UNKNOWN else UNKNOWN
        elif self.tree[name] is False:
            done = self.attempt("mkdir", lambda: os.mkdir(path))
            self.tree[name] = True if done is not UNKNOWN else UNKNOWN
        else:
            time.sleep(0.001)  # unknown until the next check reads it back

    def holder_worker(self, mine: list[int], rng: random.Random) -> None:
        holder = rng.choice(mine)
        op = rng.choices(["move", "allocate", "free", "kill"], [4, 4, 3, 1])[0]
        if op == "move":
            home = rng.choice(HOMES)
            done = self.attempt("move", lambda: write(self.mnt / home / "cgroup.procs",
                                                      str(holder)))
            self.homes[holder] = home if done is not UNKNOWN else UNKNOWN
        elif op == "allocate" and self.held[holder] is not UNKNOWN:
            type_name = rng.choice(list(CAPACITY))
            ids = self.attempt("allocate", lambda: self.allocate(holder, type_name,
                                                                 rng.randint(1, 2)))
            if ids is UNKNOWN:
                self.held[holder] = UNKNOWN
            elif ids is not None:
                self.held[holder] = self.held[holder] | set(ids)  # type: ignore[operator]
        elif op == "free" and self.held[holder]:
            if self.held[holder] is UNKNOWN:
                return
            ids = sorted(self.held[holder])[:rng.randint(1, 2)]  # type: ignore[arg-type]
            done = self.attempt("free", lambda: self.client().free(ids, pid=holder))
            self.held[holder] = UNKNOWN if done is UNKNOWN else self.held[holder] - set(ids)
        elif op == "kill":
            self.kill_holder(holder)
            mine[mine.index(holder)] = self.spawn()

    def allocate(self, holder: int, type_name: str, count: int) -> list[int] | None:
        try:
            return list(self.client().allocate(type_name, count, pid=holder))
        except ControlError as error:
            if error.errno == errno.EBUSY:
                return None  # refused by a limit: nothing changed
            raise

    def client(self) -> Client:
        """A connection of this thread's, made anew once the old one broke."""
        local = self._local
        if getattr(local, "client", None) is None:
            local.client = Client.connect(mount=str(self.mnt), timeout=2.0)
        try:
            local.client.request(op="status")
        except (OSError, ConnectionError, ValueError):
            local.client.close()
            local.client = None
            raise
        return local.client

    _local = threading.local()

    def hostile(self, rng: random.Random) -> None:
        path = self.attempt("hostile", lambda: os.getxattr(self.mnt, "user.encidfs.control"))
        if path is UNKNOWN:
            time.sleep(0.01)
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1.0)
            sock.connect(path.decode())  # type: ignore[union-attr]
            garbage = rng.choice([b'{"op": "allocate", "ty', b"\xff\xfe\n", b"[]\n", b"{" * 50,
                                  b'{"op": "free", "ids": [1], "pid": 1}\n', b""])
            sock.sendall(garbage)
            if rng.random() < 0.5:
                sock.recv(4096)

    # -- holders ------------------------------------------------------------------------------

    def spawn(self) -> int:
        process = subprocess.Popen(["sleep", "600"])
        self.starts[process.pid] = read_stat(process.pid).start_time
        self.processes.append(process)
        self.killed.discard(process.pid)  # a PID of a holder killed before: alive again
        home = HOMES[len(self.processes) % 2]
        done = self.attempt("place", lambda: write(self.mnt / home / "cgroup.procs",
                                                   str(process.pid)))
        self.homes[process.pid] = home if done is not UNKNOWN else UNKNOWN
        self.held[process.pid] = set()
        return process.pid

    def kill_holder(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        next(p for p in self.processes if p.pid == pid).wait()
        self.killed.add(pid)
        self.killed_at[pid] = time.time()
        del self.homes[pid], self.held[pid]

    # -- the checks ---------------------------------------------------------------------------

    def check(self) -> None:
        """With the workers paused: what was acknowledged is there, and the books balance."""
        mnt, problems = self.mnt, []
        for key, value in self.limits.items():
            now = read_limit(mnt, key)
            if value is not UNKNOWN and now != value:
                problems.append(f"{key} limit is {now}, acknowledged {value}")
            self.limits[key] = now
        for name, exists in self.tree.items():
            now = (mnt / "t" / name).is_dir()
            if exists is not UNKNOWN and now != exists:
                problems.append(f"t/{name} {'is there' if now else 'is gone'}, acknowledged "
                                f"{'made' if exists else 'removed'}")
            self.tree[name] = now
        members = {home: {int(p) for p in read(mnt / home / "cgroup.procs").split()}
                   for home in HOMES}
        for holder, home in self.homes.items():
            now = next((h for h, pids in members.items() if holder in pids), None)
            if home is not UNKNOWN and now != home:
                problems.append(f"holder {holder} is in {now}, acknowledged in {home}")
            if now is None:  # its move to the root, or its placement, may have been lost
                write(mnt / HOMES[0] / "cgroup.procs", str(holder))
                now = HOMES[0]
            self.homes[holder] = now
        # Killed holders' IDs go once their exits are seen.
        with Client.connect(mount=str(mnt)) as client:
            try:
                status = wait_until(lambda: (lambda s: s if not set(ids_of(s)) & self.killed
                                             else None)(client.status()),
                                    "the killed holders' IDs to be freed")
            except AssertionError:
                status = client.status()
                left = {pid: ids for pid, ids in ids_of(status).items() if pid in self.killed}
                now = {}
                for pid in left:
                    with contextlib.suppress(OSError):
                        now[pid] = read_stat(pid)
                raise AssertionError(f"killed holders still hold IDs: {left}; started "
                                     f"{[self.starts.get(p) for p in left]}; now {now}; "
                                     f"killed at {[self.killed_at.get(p) for p in left]}; "
                                     f"restarts {[r['time'] for r in status['restarts']]}"
                                     ) from None
        held = ids_of(status)
        for holder, ids in self.held.items():
            now = set(held.get(holder, []))
            if ids is not UNKNOWN and now != ids:
                problems.append(f"holder {holder} holds {sorted(now)}, acknowledged "
                                f"{sorted(ids)}")  # type: ignore[arg-type]
            self.held[holder] = now
        everything = [id_ for ids in held.values() for id_ in ids]
        if len(everything) != len(set(everything)):
            problems.append(f"an ID is held twice: {sorted(everything)}")
        problems += self.books(status)
        self.checks += 1
        assert not problems, f"after a restart (seed {SEED}):\n" + "\n".join(problems)

    def books(self, status: dict) -> list[str]:
        """In each controller, current of every cgroup = the IDs its subtree's holders were
        charged from; encids.<T>.stat used = all of them."""
        problems = []
        charged: Counter = Counter()  # by the cgroup each holder was in when charged
        for entry in status["holders"]:
            charged[(entry["cgroup"], entry["type"])] += len(entry["ids"])
        for cg in status["cgroups"]:
            for controller in status["controllers"]:
                for type_name, figures in cg.get(controller, {}).items():
                    below = sum(n for (path, t), n in charged.items() if t == type_name
                                and (path == cg["path"]
                                     or path.startswith(cg["path"].rstrip("/") + "/")))
                    if figures["current"] != below:
                        problems.append(f"{cg['path']}: {controller} {type_name} current "
                                        f"{figures['current']}, its subtree's holders hold "
                                        f"{below}")
        for type_name in CAPACITY:
            used = keyed(read(self.mnt / f"encids.{type_name}.stat"))["used"]
            total = sum(n for (_, t), n in charged.items() if t == type_name)
            if used != total:
                problems.append(f"encids.{type_name}.stat: used {used}, holders hold {total}")
        return problems


def daemon_of(mnt: Path) -> int | None:
    try:
        return int(os.getxattr(mnt, "user.encidfs.pid"))
    except OSError:
        return None


@pytest.fixture
def chaos_mount() -> Iterator[Path]:
    """A supervised mount that nobody can reach (for the delegatee), always stopped after."""
    base = Path(tempfile.mkdtemp(prefix="encidfs-chaos-"))
    base.chmod(0o755)
    mnt = base / "mnt"
    mnt.mkdir()
    encidfs = [sys.executable, "-m", "encidfs"]
    result = subprocess.run([*encidfs, "mount", str(mnt), "-o", "allow_other",
                             "--control-mode", "0666", *[f"--capacity={t}={n}" for t, n in
                                                         CAPACITY.items()]],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    supervisor = int(result.stdout.rsplit("supervisor pid ", 1)[1].rstrip(")\n"))
    try:
        yield mnt
    finally:
        subprocess.run([*encidfs, "umount", str(mnt)], capture_output=True, timeout=DEADLINE)
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_kill_9_under_mixed_load_loses_nothing_acknowledged(chaos_mount):
    mnt = chaos_mount
    chaos = Chaos(mnt)
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    for name in (*LIMITED, *HOMES, "t", "d"):
        (mnt / name).mkdir()
    for name in LIMITED:
        for controller in CONTROLLERS:
            for type_name in CAPACITY:
                chaos.limits[(name, controller, type_name)] = "max"
    for path in (mnt / "d", *(mnt / "d" / f for f in ("cgroup.procs", "cgroup.subtree_control",
                                                       "cgroup.threads"))):
        os.chown(path, NOBODY, NOBODY)
    delegatee = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups", "sh", "-c", DELEGATEE, "sh", str(mnt / "d")],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    recoveries: list[float] = []
    try:
        groups = [[chaos.spawn() for _ in range(HOLDERS_EACH)] for _ in range(HOLDER_WORKERS)]
        chaos.start("limits", chaos.limits_worker)
        chaos.start("tree", chaos.tree_worker)
        for n, mine in enumerate(groups):
            chaos.start(f"holders{n}", lambda rng, mine=mine: chaos.holder_worker(mine, rng))
        for n in range(2):
            chaos.start(f"hostile{n}", chaos.hostile)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline and not chaos.errors:
            time.sleep(chaos.rng.uniform(1.0, 3.0))  # the moment of the next kill
            victim = daemon_of(mnt)
            assert victim is not None, "the mount does not answer"
            os.kill(victim, signal.SIGKILL)
            died = time.monotonic()
            wait_until(lambda: daemon_of(mnt) not in (None, victim), "the mount to answer again")
            recoveries.append(time.monotonic() - died)
            with chaos.pauses.all(set(chaos.workers)):
                chaos.check()
        chaos.stop.set()
        for worker in chaos.workers.values():
            worker.join(DEADLINE)
        assert not chaos.errors, chaos.errors
        with chaos.pauses.all(set()):
            chaos.check()
    finally:
        chaos.stop.set()
        delegatee.kill()
        delegatee.wait()
        for process in chaos.processes:
            process.kill()
            process.wait()
    with Client.connect(mount=str(mnt)) as client:
        restarts = client.status()["restarts"]
    assert len(restarts) == len(recoveries) and all(r["reason"] == "was killed by SIGKILL"
                                                    for r in restarts)
    recoveries.sort()
    outcomes = {f"{op} {outcome}": n for (op, outcome), n in sorted(chaos.counts.items())}
    print(f"\nchaos (seed {SEED}): {len(recoveries)} kills, {chaos.checks} checks; the mount "
          f"answered again after {recoveries[len(recoveries) // 2]:.2f} s (median), "
          f"{recoveries[-1]:.2f} s (max); operations: {json.dumps(outcomes)}")
    assert recoveries[len(recoveries) // 2] < 1.0
