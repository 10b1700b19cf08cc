"""The engine's scaling with the number of cgroups, without FUSE: time an operation and memory
a cgroup."""

import os
import tracemalloc

from encidfs.engine import new_engine

from .sampling import measure
from .tables import cell

ENCIDS = 1  # subtree_control mask of the encids controller (the hierarchy's only one)
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
