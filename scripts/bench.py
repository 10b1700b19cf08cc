"""Benchmark: encidfs against the kernel's cgroupfs, a bare pyfuse3 file system and LXCFS (where
it is installed), large trees, and the engine's scaling with the number of cgroups.  A
measurement, not a test: it prints figures.

    python scripts/bench.py [--iterations N] [--baseline REV ...] [--skip-kernel] [--skip-fuse]
                            [--skip-engine] [--skip-alloc] [--skip-inotify] [--skip-large]
                            [--skip-tracking]

File operations are timed by two clients taking turns in the same run: a C one
(scripts/fileops.c), whose figures are the file systems', and this process, which adds tens of
microseconds to each.  Reads are measured twice: free, and with the client and the daemon (all
its threads) pinned to one CPU, where a request's cost is not hidden by the other CPU.

--baseline REV (repeatable) measures encidfs as it was at git revision REV beside today's, in
the same run.
"""

import argparse
import contextlib
import errno
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the engine, without installing the package

from encidfs.client import Client  # noqa: E402
from encidfs.engine import new_engine  # noqa: E402

ENCIDS = 1  # subtree_control mask of the encids controller (the hierarchy's only one)
OPERATIONS = ("read", "read pinned", "read events", "write", "procs", "mkdir+rmdir")
PINNED = "read pinned"
PIN_CPU = 0
ALL_CPUS = os.sched_getaffinity(0)
ROUNDS = 10  # turns in which the targets take their samples
RATE_RUNS = 5  # runs of the control socket's allocation rate, for each number of clients
MOUNT_DEADLINE = 10.0  # seconds for a daemon to mount before it counts as failed
SCRAPE_INTERVAL = 0.1  # seconds between scrapes of the --metrics target
REFERENCE = (
    "reference figures (issue #12, Python client), median read, pinned / free: encidfs 83-105"
    " / 126-138 us; LXCFS 91-104 / 148-150 us; bare pyfuse3 75-108 / 119-126 us; kernel"
    " cgroupfs 5.5 us"
)
TARGETS = ("targets (issue #12): read <= 0.8x LXCFS and <= 0.9x bare, pinned and free; write"
           " <= 1.0x bare; mkdir+rmdir <= 1.3x bare")


class Skip(Exception):
    """A target that cannot run here; the message says why, in one line."""


def sample(op, iterations, warmup=0, batch=1):
    """Microseconds per op(i), one sample per `batch` calls (for fast ops), after a warm-up."""
    samples = []
    for n in range(warmup + iterations):
        start = time.perf_counter_ns()
        for i in range(n * batch, (n + 1) * batch):
            op(i)
        if n >= warmup:
            samples.append((time.perf_counter_ns() - start) / batch / 1000)
    return samples


def summary(samples):
    """Median and p99."""
    return statistics.median(samples), statistics.quantiles(samples, n=100)[98]


def measure(op, iterations, batch=1):
    """Median and p99 in microseconds of op(i), after a warm-up (caches, first calls)."""
    return summary(sample(op, iterations, max(20, iterations // 10), batch))


# -- the file operations -------------------------------------------------------------------------

# An operation is the C client's arguments after COUNT WARMUP: ("read", path), ("write", path,
# data, path, data) alternating between the two, or ("mkdir", path) with its rmdir.

# The file is closed also on error or Ctrl-C: an open file keeps a lazily unmounted daemon alive.
def read_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4096)
    finally:
        os.close(fd)


def write_file(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def python_op(operation):
    """op(i) doing `operation` from this process."""
    kind, *args = operation
    if kind == "read":
        return lambda i: read_file(args[0])
    if kind == "write":
        writes = ((args[0], args[1].encode()), (args[2], args[3].encode()))
        return lambda i: write_file(*writes[i % 2])

    def mkdir_rmdir(i):
        os.mkdir(args[0])
        os.rmdir(args[0])
    return mkdir_rmdir


def python_sample(operation, iterations, warmup):
    """Microseconds per operation, timed by this process."""
    return sample(python_op(operation), iterations, warmup)


def c_sample(program, operation, iterations, warmup):
    """Microseconds per operation, timed by the C client `program`."""
    out = subprocess.run([program, str(iterations), str(warmup), *operation],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return [int(ns) / 1000 for ns in out.split()]


def file_ops(read_path, write_path, write_values, new_dir, procs_paths=None, pid=None,
             events_path=None):
    """name -> operation for one target; `write` alternates between two values, `procs` the PID
    between two cgroups; `read events` reads a cgroup.events (under --over, a kernel file passed
    through)."""
    ops = {
        "read": ("read", read_path),
        PINNED: ("read", read_path),
        "write": ("write", write_path, write_values[0], write_path, write_values[1]),
    }
    if events_path:
        ops["read events"] = ("read", events_path)
    if procs_paths:
        ops["procs"] = ("write", procs_paths[0], str(pid), procs_paths[1], str(pid))
    ops["mkdir+rmdir"] = ("mkdir", new_dir)
    return ops


@contextlib.contextmanager
def sleeper():
    """A child process of our own to move between cgroups: the only PID ever written."""
    # Its own session keeps Ctrl-C away from it, so the finally blocks decide when it ends.
    proc = subprocess.Popen(["sleep", "infinity"], start_new_session=True)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- FUSE targets ---------------------------------------------------------------------------------

def is_mounted(path):
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == path for line in mountinfo)


def close_files_on(mnt):
    """Close files of ours left open on mnt, which would keep its daemon alive after unmounting.

    Ctrl-C during a FUSE open raises as soon as os.open returns, before its fd is stored: the
    usual try/finally cannot close it.
    """
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(mnt + "/"):
                os.close(int(fd))


def unmount(path):
    """Unmount if mounted; lazily, so that a file left open by an interrupted run cannot stop it."""
    if not is_mounted(path):
        return False
    subprocess.run(["fusermount3", "-u", "-z", path], check=False)
    return True


DAEMONS = {}  # mountpoint -> its daemon's PID, for pinning
LOGS = {}  # mountpoint -> its daemon's log (a file)


def pin(pids, cpus):
    """Every thread of these processes (and of this one) on `cpus`."""
    os.sched_setaffinity(0, cpus)
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def fuse_mount(argv, env=None, cwd=ROOT):
    """Run a daemon, argv(mountpoint), in `cwd` until its mount shows; unmount and reap it on
    the way out.  The mountpoint is in a temporary directory of its own, removed with whatever
    the daemon put beside it.  (`python -m` imports from its working directory first, before
    PYTHONPATH: a checkout's daemon must run in the checkout.)"""
    work = os.path.realpath(tempfile.mkdtemp(prefix="encidfs-bench-"))
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    with tempfile.TemporaryFile() as log:
        # Its own session: Ctrl-C reaches only us, and we unmount before it goes.
        proc = subprocess.Popen(argv(mnt), cwd=cwd, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + MOUNT_DEADLINE
            while not is_mounted(mnt):
                if proc.poll() is not None:
                    log.seek(0)
                    last = (log.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                    raise Skip(f"did not mount (exit status {proc.returncode}: {last})")
                if time.monotonic() > deadline:
                    raise Skip(f"did not mount within {MOUNT_DEADLINE:.0f} s")
                time.sleep(0.01)
            DAEMONS[mnt] = proc.pid
            LOGS[mnt] = log
            yield mnt
        finally:
            DAEMONS.pop(mnt, None)
            LOGS.pop(mnt, None)
            close_files_on(mnt)
            if unmount(mnt):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # a daemon exits once its mount is gone
            proc.kill()  # still starting up, or kept alive (a no-op once it has exited)
            proc.wait()
            unmount(mnt)  # it mounted just before it was killed
            os.rmdir(mnt)  # fails, leaving everything, if it is somehow still mounted
            shutil.rmtree(work)


def encidfs_argv(source, state=False, options=()):
    """The daemon's command line, from the checkout `source`; with a durable state file beside
    the mountpoint if `state`."""
    def argv(mnt):
        extra = ["--state", os.path.join(os.path.dirname(mnt), "state.db")] if state else []
        return [sys.executable, "-m", "encidfs", "mount", mnt, "--foreground", *extra,
                *options]
    return argv


SCRAPER = """
import sys, time, urllib.request
while True:
    time.sleep(float(sys.argv[2]))
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read()
    except OSError:
        pass
"""


@contextlib.contextmanager
def scraper(port):
    """A Prometheus server's part, in a process of its own (as a real one is): GET /metrics
    every SCRAPE_INTERVAL until the end."""
    proc = subprocess.Popen([sys.executable, "-c", SCRAPER, str(port), str(SCRAPE_INTERVAL)],
                            start_new_session=True)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encidfs_target(source=ROOT, state=False, metrics=False):
    """encidfs from `source`; with `metrics`, exporting them to a scraper."""
    @contextlib.contextmanager
    def target():
        env = {**os.environ, "PYTHONPATH": str(source)}
        port = free_port()
        options = ("--metrics", f"127.0.0.1:{port}") if metrics else ()
        with fuse_mount(encidfs_argv(source, state, options), env, source) as mnt, \
                sleeper() as pid, \
                (scraper(port) if metrics else contextlib.nullcontext()):
            yield encidfs_ops(mnt, pid)
    return target


@contextlib.contextmanager
def over_target():
    """encidfs --over a scratch cgroup of the kernel's: `read` is an emulated file, `read
    events` a kernel file passed through, mkdir and moves the kernel's."""
    with kernel_scratch("-over") as (mount, scratch):
        argv = encidfs_argv(ROOT, options=("--over", scratch))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with fuse_mount(argv, env) as mnt, sleeper() as pid, returning_home(mount, pid):
            yield encidfs_ops(mnt, pid)


def encidfs_ops(mnt, pid):
    """The file operations of an encidfs mount: encids enabled, and its bench cgroups made."""
    write_file(f"{mnt}/cgroup.subtree_control", b"+encids")
    for name in ("bench", "bench-a", "bench-b"):
        os.mkdir(f"{mnt}/{name}")
    return file_ops(f"{mnt}/bench/encids.sev.current", f"{mnt}/bench/encids.sev.max",
                    ("100", "200"), f"{mnt}/bench/d",
                    (f"{mnt}/bench-a/cgroup.procs", f"{mnt}/bench-b/cgroup.procs"), pid,
                    f"{mnt}/bench/cgroup.events")


def bare_target(timeout):
    @contextlib.contextmanager
    def target():
        bare_fs = str(ROOT / "scripts" / "bare_fs.py")
        with fuse_mount(lambda mnt: [sys.executable, bare_fs, mnt, "--timeout", timeout]) as mnt:
            yield file_ops(f"{mnt}/value", f"{mnt}/limit", ("100", "200"), f"{mnt}/d")
    return target


def lxcfs_target():
    """LXCFS (C, libfuse's threaded loop) serving proc/uptime, which it computes per read."""
    @contextlib.contextmanager
    def target():
        if shutil.which("lxcfs") is None:
            raise Skip("lxcfs is not installed")
        with tempfile.TemporaryDirectory(prefix="encidfs-bench-lxcfs-") as run:
            def argv(mnt: str) -> list[str]:
                return ["lxcfs", "--foreground", "--pidfile", f"{run}/lxcfs.pid", mnt]

            with fuse_mount(argv) as mnt:
                path = f"{mnt}/proc/uptime"
                yield {"read": ("read", path), PINNED: ("read", path)}
    return target


# -- the kernel's cgroup2 mount -------------------------------------------------------------------

def cgroup2_mount():
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, path, fstype, *_ = line.split()
            if fstype == "cgroup2":
                return path
    raise Skip("no cgroup2 mount")


def cgroup_dir(mount, pid):
    """The directory of pid's cgroup in the cgroup2 mount."""
    with open(f"/proc/{pid}/cgroup") as lines:
        for line in lines:
            if line.startswith("0::"):
                return os.path.join(mount, line[3:].strip().lstrip("/"))
    raise Skip(f"no cgroup2 membership in /proc/{pid}/cgroup")


@contextlib.contextmanager
def kernel_scratch(suffix=""):
    """A scratch cgroup under our own, removed with every cgroup made in it."""
    mount = cgroup2_mount()
    scratch = os.path.join(cgroup_dir(mount, os.getpid()),
                           f"encidfs-bench-{os.getpid()}{suffix}")
    os.mkdir(scratch)
    try:
        yield mount, scratch
    finally:
        for path, _, _ in os.walk(scratch, topdown=False):
            os.rmdir(path)


@contextlib.contextmanager
def returning_home(mount, pid):
    """pid goes back to the cgroup it started in (if something has not killed it)."""
    home = f"{cgroup_dir(mount, pid)}/cgroup.procs"
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            write_file(home, str(pid).encode())


@contextlib.contextmanager
def kernel_target():
    """Our child moves between scratch cgroups and returns to its own at the end."""
    with kernel_scratch() as (mount, scratch):
        # misc is the upstream form of encids; pids is the next closest counter.
        with open(f"{scratch}/cgroup.controllers") as f:
            counters = [c for c in ("misc", "pids") if c in f.read().split()]
        if counters:
            write_file(f"{scratch}/cgroup.subtree_control", f"+{counters[0]}".encode())
        counter = f"{counters[0]}.current" if counters else "cgroup.events"
        print(f"kernel: scratch cgroup {scratch}, read is {counter}")
        for name in ("bench", "bench-a", "bench-b"):
            os.mkdir(f"{scratch}/{name}")
        with sleeper() as pid, returning_home(mount, pid):
            yield file_ops(f"{scratch}/bench/{counter}",
                           f"{scratch}/bench/cgroup.max.descendants", ("100", "200"),
                           f"{scratch}/bench/d",
                           (f"{scratch}/bench-a/cgroup.procs",
                            f"{scratch}/bench-b/cgroup.procs"), pid,
                           f"{scratch}/bench/cgroup.events")


# -- tables ---------------------------------------------------------------------------------------

def cell(value, width=8, digits=0):
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def ratio(a, b, width, digits):
    return f"{a / b:{width - 1}.{digits}f}x" if a is not None and b else f"{'-':>{width}}"


def print_fuse_tables(results, iterations, baselines):
    """A table for each client: client -> target -> operation -> (median, p99)."""
    columns = ("encidfs", *baselines, "--state", "--metrics", "--over", "kernel", "bare 0 s",
               "bare 1 s", "lxcfs")
    print(f"\nfile operations, microseconds over {iterations} iterations (encidfs: its default "
          "runtime journal; @REV: encidfs at that revision; --state: a durable state file; "
          f"--metrics: exporting, scraped every {SCRAPE_INTERVAL * 1000:.0f} ms; "
          "--over: over a scratch cgroup of the kernel's (read: an emulated file; read "
          "events: a kernel file passed through); "
          "bare: pyfuse3 with direct I/O, entry/attr timeouts 0 s or 1 s; lxcfs: proc/uptime; "
          f"{PINNED}: client and daemon on CPU {PIN_CPU}); timed by a C client "
          "(scripts/fileops.c) and by Python, in turns")
    ratios = [*baselines, "--metrics", "--over", "bare 0 s", "bare 1 s", "lxcfs", "kernel"]
    for client, figures_of in results.items():
        print(f"{client + ' client':14}" + "".join(f"{name[:16]:>18}" for name in columns)
              + "".join(f"{'encidfs/':>11}" for _ in ratios))
        print(f"{'operation':14}" + f"{'median':>10}{'p99':>8}" * len(columns)
              + "".join(f"{name[:10]:>11}" for name in ratios))
        for op in OPERATIONS:
            figures = [figures_of.get(name, {}).get(op, (None, None)) for name in columns]
            medians = {name: median for name, (median, _) in zip(columns, figures)}
            print(f"{op:14}" + "".join(cell(m, 10) + cell(p) for m, p in figures)
                  + "".join(ratio(medians["encidfs"], medians[name], 11, 2) for name in ratios))
    print(REFERENCE)
    print(TARGETS)


@contextlib.contextmanager
def checkout(rev):
    """The tree of git revision `rev`, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="encidfs-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        yield Path(tree)


# -- engine scaling -------------------------------------------------------------------------------

DEPTH = 64
LEAVES = 14  # leaf cgroups under each chain cgroup: 64 * (1 + 14) = 960 cgroups a chain


def build(size):
    """size cgroups: chains DEPTH deep enabling encids all along, each level with LEAVES leaves.

    Returns the hierarchy and the first chain's cgroup at depth DEPTH - 1, whose leaves are at
    depth DEPTH.
    """
    h = new_engine({"sev": 509, "sev_es": 99}).hierarchy
    h.write_subtree_control(h.root, ENCIDS, 0)
    count = 0
    deep = None
    while count < size:
        cg = h.root
        for _ in range(DEPTH):
            if count == size:
                break
            cg = h.mkdir(cg, f"c{count}")
            h.write_subtree_control(cg, ENCIDS, 0)
            count += 1
            if deep is None and cg.level == DEPTH - 1:
                deep = cg
            for leaf in range(min(LEAVES, size - count)):
                h.mkdir(cg, f"l{leaf}")
                count += 1
    h.drain_events()  # the daemon drains them as it goes; they are not the tree's memory
    return h, deep


def engine_scaling(iterations):
    sizes = (1_000, 10_000, 100_000)
    rows = {}
    for size in sizes:
        tracemalloc.start()
        h, parent = build(size)
        memory = tracemalloc.get_traced_memory()[0] / size
        tracemalloc.stop()
        encids = h.controllers[0]
        a, b = parent.children["l0"], parent.children["l1"]
        pid = os.getpid()  # any number: the engine never looks at the process

        ops = {
            f"mkdir+rmdir at depth {DEPTH}": lambda i: h.rmdir(h.mkdir(parent, "x")),
            f"try_charge+uncharge at depth {DEPTH}":
                lambda i: encids.uncharge(encids.try_charge(a, "sev", 1)),
            f"attach between depth-{DEPTH} cgroups": lambda i: h.procs.attach(pid, (a, b)[i % 2]),
            "set_max": lambda i: encids.set_max(a, 0, 100 + i % 2),
        }
        for name, op in ops.items():
            # Drained after every operation, as the daemon does after every request: left to
            # grow, the queue's cost to the garbage collector would show in the figures.
            def request(i, op=op):
                op(i)
                h.drain_events()
            # Batches of 20: one perf_counter_ns pair costs about as much as the faster ops.
            rows.setdefault(name, []).append(measure(request, iterations, batch=20)[0])
        rows.setdefault("memory per cgroup, bytes", []).append(memory)

    print("\nengine scaling (no FUSE), median microseconds per operation"
          f" over {iterations} samples")
    print(f"{'cgroups':40}" + "".join(f"{size:>10,}" for size in sizes))
    for name, values in rows.items():
        digits = 0 if name.startswith("memory") else 2
        print(f"{name:40}" + "".join(cell(v, 10, digits) for v in values))
    print("targets: no operation grows with the number of cgroups;"
          " memory under 2048 bytes per cgroup")


def measure_interleaved(targets, iterations, fileops):
    """All targets mounted at once and measured in turns by both clients (the C one is the
    program `fileops`), so that whatever else the machine does meanwhile weighs on each of them
    alike."""
    clients = {"C": functools.partial(c_sample, fileops), "Python": python_sample}
    with contextlib.ExitStack() as stack:
        running = {}
        for name, target in targets.items():
            try:
                running[name] = stack.enter_context(target())
            except (Skip, OSError) as e:
                print(f"{name}: skipped, {e}")
        samples = {client: {name: {op: [] for op in ops} for name, ops in running.items()}
                   for client in clients}
        for turn in range(ROUNDS):
            warmup = max(20, iterations // 10) if turn == 0 else 0
            for name, ops in running.items():
                for op, operation in ops.items():
                    if op == PINNED:
                        pin(DAEMONS.values(), {PIN_CPU})  # the C client inherits our CPU
                    try:
                        for client, take in clients.items():
                            samples[client][name][op] += take(operation, iterations // ROUNDS,
                                                              warmup)
                    finally:
                        if op == PINNED:
                            pin(DAEMONS.values(), ALL_CPUS)
    return {client: {name: {op: summary(values) for op, values in ops.items()}
                     for name, ops in of_client.items()}
            for client, of_client in samples.items()}


# -- inotify -------------------------------------------------------------------------------------

def move_to_modify(parent, pid, iterations):
    """Microseconds from the start of a cgroup.procs write that empties one cgroup and populates
    another to the IN_MODIFY on the populated one's cgroup.events."""
    from inotify_simple import INotify, flags

    for name in ("inotify-a", "inotify-b"):
        os.mkdir(f"{parent}/{name}")
    try:
        with INotify() as inotify:
            watched = {inotify.add_watch(f"{parent}/{name}/cgroup.events", flags.MODIFY): name
                       for name in ("inotify-a", "inotify-b")}

            def move(i):
                target = ("inotify-a", "inotify-b")[i % 2]
                write_file(f"{parent}/{target}/cgroup.procs", str(pid).encode())
                while not any(watched[event.wd] == target
                              for event in inotify.read(timeout=int(MOUNT_DEADLINE * 1000))):
                    pass

            return measure(move, iterations)
    finally:
        for name in ("inotify-a", "inotify-b"):
            with contextlib.suppress(OSError):  # pid has left it before the end of move()
                os.rmdir(f"{parent}/{name}")


# Times statfs(2) of a path, getppid(2) (a call no filter wants) and open(2)+close(2) of a
# file, in nanoseconds a call.
SYSCALLS_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	long n = atol(argv[2]);
	struct statfs answer;
	double start = now();

	for (long i = 0; i < n; i++)
		if (statfs(argv[1], &answer))
			return 1;
	double statfs_ns = (now() - start) / n;
	start = now();
	for (long i = 0; i < n * 100; i++)
		getppid();
	double other_ns = (now() - start) / (n * 100);
	start = now();
	for (long i = 0; i < n; i++)
		close(open(argv[3], O_RDONLY));
	printf("%.0f %.1f %.0f %lx\n", statfs_ns, other_ns, (now() - start) / n,
           (long)answer.f_type);
	return 0;
}
"""


# An open-heavy command: Python importing a few packages (some hundreds of opens and stats).
OPEN_HEAVY = [sys.executable, "-I", "-c", "import asyncio, email.mime.text, http.server, json, "
              "logging.handlers, xml.dom.minidom, unittest"]


def exec_costs(iterations):
    """What `encidfs exec`'s answers cost: a statfs of the mount through the supervisor, a
    call not intercepted, an open (intercepted with --mounts and --proc-cgroup; /proc/self/
    cgroup answered by the latter), and an open-heavy command, beside plain namespaces."""
    print(f"\nencidfs exec: nanoseconds a call, C loop ({iterations} statfs, "
          f"{iterations * 100} getppid, {iterations} open+close)")
    with tempfile.TemporaryDirectory(prefix="encidfs-syscalls-") as work:
        source, program = os.path.join(work, "syscalls.c"), os.path.join(work, "syscalls")
        with open(source, "w") as f:
            f.write(SYSCALLS_C)
        subprocess.run(["gcc", "-O2", "-o", program, source], check=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with fuse_mount(encidfs_argv(ROOT), env) as mnt:
            plain = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f'mount --bind "{mnt}" /sys/fs/cgroup && exec "$@"', "sh"]
            exec_ = [sys.executable, "-m", "encidfs", "exec", "--mount", mnt]
            runs = {"encidfs exec": [*exec_, "--"], "exec --mounts": [*exec_, "--mounts", "--"],
                    "exec --proc-cgroup": [*exec_, "--proc-cgroup", "--"],
                    "plain namespaces": plain}
            for name, prefix in runs.items():
                for path in ("/sys/fs/cgroup", "/"):
                    out = subprocess.run([*prefix, program, path, str(iterations),
                                          "/etc/hostname"], env=env,
                                         capture_output=True, text=True, check=True).stdout
                    statfs_ns, other_ns, open_ns, f_type = out.split()
                    print(f"  {name:18} statfs {path:15} {statfs_ns:>8} ns (f_type 0x{f_type});"
                          f"  getppid {other_ns:>6} ns;  open+close {open_ns:>6} ns")
            for name, prefix in runs.items():
                out = subprocess.run([*prefix, program, "/", str(iterations // 10),
                                      "/proc/self/cgroup"], env=env, capture_output=True,
                                     text=True, check=True).stdout
                print(f"  {name:18} open+close of /proc/self/cgroup {out.split()[2]:>8} ns")
            print("  an open-heavy command (python importing packages), median of 5 runs:")
            for name, prefix in runs.items():
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    subprocess.run([*prefix, *OPEN_HEAVY], env=env, check=True)
                    times.append(time.perf_counter() - start)
                print(f"  {name:18} {statistics.median(times) * 1000:8.0f} ms")


def inotify_latency(iterations):
    """encidfs truncates each notified file through its own mount (fuse/inotify.py): what a
    watcher waits, beside the kernel, whose cgroup_file_notify() holds a file's next
    notification until 10 ms after its last (CGROUP_FILE_NOTIFY_MIN_INTV)."""
    print(f"\ninotify: a cgroup.procs write to the IN_MODIFY on the new cgroup's cgroup.events,"
          f" microseconds over {iterations} moves")

    def encidfs():
        with fuse_mount(encidfs_argv(ROOT)) as mnt, sleeper() as pid:
            return move_to_modify(mnt, pid, iterations)

    def kernel():
        with kernel_scratch() as (mount, scratch), sleeper() as pid, returning_home(mount, pid):
            return move_to_modify(scratch, pid, iterations)

    for name, target in (("encidfs", encidfs), ("kernel", kernel)):
        try:
            median, p99 = target()
            print(f"  {name:10} median {median:8.0f}   p99 {p99:8.0f}")
        except (Skip, OSError) as e:
            print(f"  {name:10} skipped, {e}")


# -- large trees ----------------------------------------------------------------------------------

def read_all(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 65536):
            pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def paused_children(count):
    """`count` forks of this process that wait for SIGKILL; their PIDs."""
    children = []
    try:
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                try:  # a fork runs none of the parent's clean-up, Ctrl-C or not
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    while True:
                        signal.pause()
                finally:
                    os._exit(0)
            children.append(pid)
        yield children
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)


def large_tree(cgroups, members, iterations, sources):
    """What an operator looks at on a big host: milliseconds for `encidfs status` (the whole
    command, and its request alone), the root's cgroup.procs and cgroup.stat; for each of
    `sources` (name -> checkout), each with its own daemon and command."""
    fanout = 100  # children of each parent; the parents enable encids
    print(f"\nlarge tree: {cgroups:,} cgroups ({fanout - 1} leaves under each of "
          f"{cgroups // fanout} parents), {members:,} member processes; median and p99 "
          f"milliseconds over {iterations} looks")
    for source_name, source in sources.items():
        env = {**os.environ, "PYTHONPATH": str(source)}
        with fuse_mount(encidfs_argv(source), env, source) as mnt, \
                paused_children(members) as children:
            write_file(f"{mnt}/cgroup.subtree_control", b"+encids")
            leaves = []
            for p in range(cgroups // fanout):
                os.mkdir(f"{mnt}/p{p}")
                write_file(f"{mnt}/p{p}/cgroup.subtree_control", b"+encids")
                for c in range(fanout - 1):
                    os.mkdir(f"{mnt}/p{p}/c{c}")
                    leaves.append(f"{mnt}/p{p}/c{c}")
            for n, pid in enumerate(children):
                write_file(f"{leaves[n * len(leaves) // members]}/cgroup.procs",
                           str(pid).encode())
            client = Client.connect(mount=mnt)
            command = [sys.executable, "-m", "encidfs", "status", "--mount", mnt]
            looks = {
                "encidfs status": lambda i: subprocess.run(command, check=True, cwd=source,
                                                           env=env, stdout=subprocess.DEVNULL),
                # What the command asks (a daemon from before sparse replies sends them whole).
                "status request (sparse)": lambda i: client.status(sparse=True),
                "status request (full)": lambda i: client.status(),
                "cat cgroup.procs (root)": lambda i: read_all(f"{mnt}/cgroup.procs"),
                "cat cgroup.stat (root)": lambda i: read_all(f"{mnt}/cgroup.stat"),
            }
            for name, look in looks.items():
                median, p99 = summary(sample(look, iterations, warmup=2))
                print(f"  {source_name:10} {name:26} median {median / 1000:8.1f}"
                      f"   p99 {p99 / 1000:8.1f}")
            client.close()
    print("target: each under 100 ms")


# -- process tracking ----------------------------------------------------------------------------

STORMS = (("flat", 20_000), ("exec", 3_000), ("wide", 1_500), ("chain", 2_000),
          ("threads", 6_400), ("daemons", 300))


def daemon_cpu_ns(pid):
    """CPU time of every thread of a process, in nanoseconds (schedstat: finer than stat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


@contextlib.contextmanager
def compiled(source, *flags):
    """The C program `source`, compiled into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="encidfs-bench-") as work:
        program = os.path.join(work, source.stem)
        subprocess.run(["gcc", "-O2", *flags, "-o", program, str(source)], check=True)
        yield program


def run_storm(program, mode, n, cgroup=None):
    """One storm, in `cgroup` if given: (seconds it took, what the cgroup listed while its
    daemons lived and the expected count, what it listed once all was gone)."""
    proc = subprocess.Popen([program, mode, str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        if cgroup:
            write_file(f"{cgroup}/cgroup.procs", str(proc.pid).encode())
        start = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        alive = proc.stdout.readline().split()[1:]
        seconds = time.perf_counter() - start
        listed = count_listed(cgroup)
    finally:
        proc.stdin.close()
        proc.wait()
    return seconds, listed, 1 + len(alive), count_listed(cgroup)


def count_listed(cgroup):
    """How many processes cgroup.procs lists (0 without a cgroup), or the error reading it."""
    if cgroup is None:
        return 0
    try:
        with open(f"{cgroup}/cgroup.procs") as f:
            return len(f.read().split())
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))


def tracking(sources):
    """What following the host's processes costs the daemon (CPU per process, C fork loops)
    and whether storms in a member cgroup leave the books exact, for each of `sources`."""
    flat = STORMS[0][1]
    print(f"\nprocess tracking: daemon CPU per process, {flat:,} forks of a C loop (target "
          "(issue #20): <= 5 us a host process, <= 40 us a member); storms in a member cgroup "
          "(listed while alive / expected, then listed once gone: 0)")
    with compiled(ROOT / "tests" / "mount" / "storm.c", "-pthread") as program:
        for name, source in sources.items():
            for tracking_mode in ("auto", "scan"):
                env = {**os.environ, "PYTHONPATH": str(source)}
                argv = encidfs_argv(source, options=("--tracking", tracking_mode))
                with fuse_mount(argv, env, source) as mnt:
                    tracking_row(f"{name} {tracking_mode}", program, mnt, flat)
                    log = LOGS[mnt].fileno()  # read at an offset: the daemon shares the file's
                    lost = os.pread(log, os.fstat(log).st_size, 0).count(
                        b"process events were lost")
                    print(f"  {'':18} lost events noticed: {lost} times")
        try:
            over_tracking(program, flat)
        except (Skip, OSError) as e:
            print(f"  --over: skipped, {e}")


def over_tracking(program, flat):
    """The same under --over (membership the kernel's: nothing is followed)."""
    with kernel_scratch("-tracking") as (mount, scratch):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with fuse_mount(encidfs_argv(ROOT, options=("--over", scratch)), env) as mnt:
            tracking_row("--over", program, mnt, flat, home=mount)


def tracking_row(label, program, mnt, flat, home=None):
    """Daemon CPU per process of a fork loop (with no member, beside one, as members), and the
    storms in a member cgroup; `home`: the kernel's mount our sleeper goes back to."""
    daemon = DAEMONS[mnt]
    os.mkdir(f"{mnt}/member")
    os.mkdir(f"{mnt}/storm")

    def cpu_per_process(cgroup=None):
        before = daemon_cpu_ns(daemon)
        run_storm(program, "flat", flat, cgroup)
        time.sleep(0.2)  # what is left of the batch
        return (daemon_cpu_ns(daemon) - before) / flat / 1000

    alone = cpu_per_process()
    with sleeper() as pid, (returning_home(home, pid) if home else contextlib.nullcontext()):
        write_file(f"{mnt}/member/cgroup.procs", str(pid).encode())
        beside = cpu_per_process()
        member = cpu_per_process(f"{mnt}/storm")
        print(f"  {label:18} host process: {alone:6.1f} us with no member, "
              f"{beside:6.1f} us beside one; member process: {member:6.1f} us")
        storms = []
        for mode, n in STORMS:
            seconds, listed, expected, after = run_storm(program, mode, n, f"{mnt}/storm")
            storms.append(f"{mode} {n / seconds:,.0f}/s {listed}/{expected} {after}")
        print(f"  {'':18} " + ";  ".join(storms))


# -- allocations through the control socket ----------------------------------------------------

def clients_at_once(mnt, clients, each):
    """Seconds for `clients` processes, connected first and started together, to make `each`
    allocate+free round trips apiece (processes: threads would measure the client's GIL)."""
    start_r, start_w = os.pipe()
    ready_r, ready_w = os.pipe()
    children = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(start_w)
                client = Client.connect(mount=mnt)
                os.write(ready_w, b".")
                os.close(ready_w)
                os.read(start_r, 1)  # until the parent closes its end
                for _ in range(each):
                    client.free(client.allocate("sev"))
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    os.close(start_r)
    os.close(ready_w)
    while os.read(ready_r, clients):  # until every client has connected or failed
        pass
    os.close(ready_r)
    start = time.perf_counter()
    os.close(start_w)
    failed = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children)
    if failed:
        raise Skip(f"{failed} of {clients} clients failed")
    return time.perf_counter() - start


def allocation_rate(round_trips, sources):
    """allocate+free round trips per second through the control socket, 1 and 8 clients, for
    each of `sources`: name -> (checkout, with a state file)."""
    print(f"\nallocations through the control socket ({round_trips} allocate+free round trips a"
          f" run, median (min-max) of {RATE_RUNS} runs; target (issue #12): >= 15,000/s with 8"
          " clients)")
    for name, (source, state) in sources.items():
        env = {**os.environ, "PYTHONPATH": str(source)}
        with fuse_mount(encidfs_argv(source, state), env, source) as mnt:
            for clients in (1, 8):
                each = round_trips // clients
                # One run is a fraction of a second: the machine's swings show in a single one.
                rates = sorted(each * clients / clients_at_once(mnt, clients, each)
                               for _ in range(RATE_RUNS))
                print(f"  {name:18} {clients} client{'s' if clients > 1 else ' '}: "
                      f"{statistics.median(rates):8,.0f} round trips/s"
                      f"   ({rates[0]:,.0f}-{rates[-1]:,.0f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000,
                        help="samples per operation (default 2000)")
    parser.add_argument("--skip-kernel", action="store_true",
                        help="skip the kernel's cgroup2 mount")
    parser.add_argument("--skip-fuse", action="store_true",
                        help="skip encidfs and the bare file system")
    parser.add_argument("--skip-engine", action="store_true", help="skip the engine scaling")
    parser.add_argument("--skip-alloc", action="store_true",
                        help="skip the control socket's allocation rate")
    parser.add_argument("--skip-inotify", action="store_true",
                        help="skip the latency of IN_MODIFY after a move")
    parser.add_argument("--skip-tracking", action="store_true",
                        help="skip process tracking (its CPU cost and storms)")
    parser.add_argument("--skip-large", action="store_true",
                        help="skip the large tree (20,000 cgroups, 5,000 processes)")
    parser.add_argument("--baseline", metavar="REV", action="append", default=[],
                        help="also measure encidfs at this git revision, in the same run "
                             "(repeatable)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        baselines = [f"@{rev[:7]}" for rev in args.baseline]
        sources = {"encidfs": (ROOT, False)}
        for name, rev in zip(baselines, args.baseline):
            sources[name] = (stack.enter_context(checkout(rev)), False)
        sources["--state"] = (ROOT, True)
        targets = {}
        if not args.skip_fuse:
            targets.update({name: encidfs_target(source, state)
                            for name, (source, state) in sources.items()})
            targets["--metrics"] = encidfs_target(metrics=True)
        if not args.skip_fuse and not args.skip_kernel:
            targets["--over"] = over_target
        if not args.skip_kernel:
            targets["kernel"] = kernel_target
        if not args.skip_fuse:
            targets["bare 0 s"] = bare_target("0")
            targets["bare 1 s"] = bare_target("1")
            targets["lxcfs"] = lxcfs_target()
        if targets:
            with compiled(ROOT / "scripts" / "fileops.c") as fileops:
                print_fuse_tables(measure_interleaved(targets, args.iterations, fileops),
                                  args.iterations, baselines)
        if not args.skip_alloc:
            try:
                allocation_rate(args.iterations, sources)
            except (Skip, OSError) as e:
                print(f"allocations: skipped, {e}")
        if not args.skip_tracking:
            try:
                tracking({name: source for name, (source, state) in sources.items()
                          if not state})
            except (Skip, OSError) as e:
                print(f"tracking: skipped, {e}")
        if not args.skip_large:
            try:
                large_tree(20_000, 5_000, 20, {name: source for name, (source, state)
                                               in sources.items() if not state})
            except (Skip, OSError) as e:
                print(f"large tree: skipped, {e}")
    if not args.skip_inotify and not args.skip_fuse:
        inotify_latency(args.iterations)
    if not args.skip_fuse:
        exec_costs(args.iterations)
    if not args.skip_engine:
        engine_scaling(args.iterations)


if __name__ == "__main__":
    main()
