"""The control socket's allocation rate: allocate+free round trips a second, one client and
eight."""

import os
import statistics
import time

from encidfs.client import Client

from . import Skip
from .mounts import encidfs_argv, fuse_mount

RATE_RUNS = 5  # runs of the control socket's allocation rate, for each number of clients


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
