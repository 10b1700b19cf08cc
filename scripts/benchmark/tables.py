"""The file operations' tables: a column pair (median, p99) a target, and encidfs's ratios."""

from .fileops import OPERATIONS, PIN_CPU, PINNED
from .targets import SCRAPE_INTERVAL

REFERENCE = (
    "reference figures (issue #12, Python client), median read, pinned / free: encidfs 83-105"
    " / 126-138 us; LXCFS 91-104 / 148-150 us; bare pyfuse3 75-108 / 119-126 us; kernel"
    " cgroupfs 5.5 us"
)
TARGETS = ("targets (issue #12): read <= 0.8x LXCFS and <= 0.9x bare, pinned and free; write"
           " <= 1.0x bare; mkdir+rmdir <= 1.3x bare")


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
