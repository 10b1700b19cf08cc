"""A large tree (tens of thousands of cgroups, thousands of member processes): what an operator's
looks at it cost."""

import contextlib
import os
import signal
import subprocess
import sys

from encidfs.client import Client

from .mounts import encidfs_argv, fuse_mount, write_file
from .sampling import sample, summary


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
