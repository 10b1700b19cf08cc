"""What `encidfs exec`'s answers cost a process inside, from a C loop of system calls and an
open-heavy command."""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import ROOT
from .mounts import encidfs_argv, fuse_mount

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
