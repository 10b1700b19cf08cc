"""The file operations: each target's, both clients that time them (the C one,
scripts/fileops.c, and this process), and every target measured in turns."""

import contextlib
import functools
import os
import subprocess

from . import Skip
from .mounts import DAEMONS, read_file, write_file
from .sampling import sample, summary

OPERATIONS = ("read", "read pinned", "read events", "write", "procs", "mkdir+rmdir")
PINNED = "read pinned"
PIN_CPU = 0
ALL_CPUS = os.sched_getaffinity(0)
ROUNDS = 10  # turns in which the targets take their samples

# An operation is the C client's arguments after COUNT WARMUP: ("read", path), ("write", path,
# data, path, data) alternating between the two, or ("mkdir", path) with its rmdir.


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


def pin(pids, cpus):
    """Every thread of these processes (and of this one) on `cpus`."""
    os.sched_setaffinity(0, cpus)
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), cpus)


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
