"""Process tracking: the daemon's CPU a process forked, and whether storms of processes in a
member cgroup leave its books exact."""

import contextlib
import errno
import os
import subprocess
import time

from . import ROOT, Skip, compiled
from .mounts import (
    DAEMONS,
    LOGS,
    encidfs_argv,
    fuse_mount,
    kernel_scratch,
    returning_home,
    sleeper,
    write_file,
)

STORMS = (("flat", 20_000), ("exec", 3_000), ("wide", 1_500), ("chain", 2_000),
          ("threads", 6_400), ("daemons", 300))


def daemon_cpu_ns(pid):
    """CPU time of every thread of a process, in nanoseconds (schedstat: finer than stat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


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
