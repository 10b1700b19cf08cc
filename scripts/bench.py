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

Each section is a module of scripts/benchmark/; this file reads the command line and runs them.
"""

import argparse
import contextlib

from benchmark import ROOT, Skip, compiled
from benchmark.alloc import allocation_rate
from benchmark.engine import engine_scaling
from benchmark.exec import exec_costs
from benchmark.fileops import measure_interleaved
from benchmark.inotify import inotify_latency
from benchmark.mounts import checkout
from benchmark.tables import print_fuse_tables
from benchmark.targets import bare_target, encidfs_target, kernel_target, lxcfs_target, over_target
from benchmark.tracking import tracking
from benchmark.trees import large_tree


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
