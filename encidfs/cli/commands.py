"""Client commands: run, alloc, free, status, top (built on encidfs.client)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from ..control.client import DEFAULT_TIMEOUT, Client, ControlError, figures

DEFAULT_MOUNT = os.environ.get("ENCIDFS_MOUNT", "/run/encidfs")
GUEST_HELP = "the guests the IDs are for (default: T's own; snp takes sev_es IDs)"
# sev_hardware_setup()'s names for the guests, in its log lines.
KVM_NAMES = {"sev": "SEV", "sev_es": "SEV-ES", "snp": "SEV-SNP"}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    def connection_options(parser: argparse.ArgumentParser) -> None:
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--mount", metavar="MNT",
                           help=f"the encidfs mountpoint (default {DEFAULT_MOUNT})")
        where.add_argument("--control", metavar="SOCK", help="the control socket")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                            help=f"give up on a daemon that does not answer (default "
                                 f"{DEFAULT_TIMEOUT:g})")

    run = commands.add_parser("run", help="allocate IDs, then exec a command that holds them")
    connection_options(run)
    run.add_argument("--cgroup", metavar="PATH", help="move into this cgroup first (e.g. /a/b)")
    run.add_argument("--type", required=True, metavar="T")
    run.add_argument("--count", type=int, default=1, metavar="N")
    run.add_argument("--guest", metavar="G", help=GUEST_HELP)
    run.add_argument("--print-ids", action="store_true", help="print the IDs to stderr")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(handler=_run)

    alloc = commands.add_parser("alloc", help="allocate IDs held by a process")
    connection_options(alloc)
    alloc.add_argument("--type", required=True, metavar="T")
    alloc.add_argument("--count", type=int, default=1, metavar="N")
    alloc.add_argument("--guest", metavar="G", help=GUEST_HELP)
    alloc.add_argument("--pid", type=int, required=True)
    alloc.set_defaults(handler=_alloc)

    free = commands.add_parser("free", help="free IDs of a holder")
    connection_options(free)
    free.add_argument("--pid", type=int, required=True,
                      help="the process that holds them (who may signal it, or the mount's "
                           "owner, frees)")
    free.add_argument("ids", type=int, nargs="+", metavar="ID")
    free.set_defaults(handler=_free)

    status = commands.add_parser("status", help="the tree with usage, limits and holders")
    connection_options(status)
    status.set_defaults(handler=_status)

    top = commands.add_parser("top", help="a live view of the tree (q quits)")
    connection_options(top)
    top.add_argument("-d", dest="delay", type=float, default=1.0, metavar="SECONDS",
                     help="seconds between refreshes (default 1)")
    top.add_argument("-n", dest="count", type=int, metavar="COUNT",
                     help="print COUNT snapshots as text and exit")
    top.set_defaults(handler=_top)


def main(argv: list[str]) -> int | None:
    """Run argv if it is a client command, parsed as `encidfs` parses it; None otherwise."""
    parser = argparse.ArgumentParser(prog="encidfs")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parsers(commands)
    if not argv or argv[0] not in commands.choices:
        return None
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    try:
        return args.handler(args)
    except ControlError as error:
        kind = f"{args.type}: " if getattr(args, "type", None) else ""
        print(f"encidfs: {kind}{errno.errorcode.get(error.errno, error.errno)}: "
              f"{error.strerror}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"encidfs: {error.strerror or error}", file=sys.stderr)
        return 1


def _connect(args: argparse.Namespace) -> Client:
    if args.control:
        return Client.connect(control=args.control, timeout=args.timeout)
    return Client.connect(mount=args.mount or DEFAULT_MOUNT, timeout=args.timeout)


def _run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("encidfs: run needs a command after --", file=sys.stderr)
        return 2
    with _connect(args) as client:
        if args.cgroup:
            mount = args.mount or client.status(sparse=True)["mountpoint"]
            procs = os.path.join(mount, args.cgroup.strip("/"), "cgroup.procs")
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        ids = client.allocate(args.type, args.count, guest=args.guest)
    if args.print_ids:
        print(" ".join(map(str, ids)), file=sys.stderr, flush=True)
    # The same process goes on as the command, so the IDs live exactly as long as it does.
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        print(f"encidfs: {argv[0]}: {error.strerror}", file=sys.stderr)
        return 127


def _alloc(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        for id_ in client.allocate(args.type, args.count, pid=args.pid, guest=args.guest):
            print(id_)
    return 0


def _free(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.free(args.ids, pid=args.pid)
    return 0


def _top(args: argparse.Namespace) -> int:
    from . import top  # curses only where it is needed

    with _connect(args) as client:
        return top.run(client, args.delay, args.count)


def _status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        status = client.status(sparse=True)
    print(f"mount: {status['mountpoint']}   process tracking: {status['tracking']}")
    restarts = status.get("restarts", [])
    if restarts:
        last = restarts[-1]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
        print(f"daemon restarted {len(restarts)} time{'s' if len(restarts) > 1 else ''}; "
              f"last at {when}: it {last['reason']}")
    for limitation in status.get("limitations", []):
        print(f"note: {limitation}")
    if "capacities" in status:
        capacities = "  ".join(f"{name} {n}" for name, n in status["capacities"].items())
        print(f"capacities: {capacities}   from {status['capacity_source']}")
    for guest in status.get("guests", []):  # as KVM logs them
        print(f"{KVM_NAMES[guest['guest']]} {guest['state']} (ASIDs {guest['first']} - "
              f"{guest['last']})")
    print(f"controllers: {' '.join(status.get('controllers', []))}")
    tree = []  # printed at once: 20,000 cgroups are 40,000 lines
    plain: dict[str, str] = {}  # a controller's line for a new cgroup's figures, as most are
    for cg in status["cgroups"]:
        procs = f"{len(cg['procs'])} procs" if cg.get("procs") else ""
        lines = []
        for controller in status.get("controllers", []):
            if controller not in cg:
                continue
            if cg[controller] or cg["path"] == "/":
                lines.append(_figures_line(status, cg, controller))
                continue
            if controller not in plain:
                plain[controller] = _figures_line(status, cg, controller)
            lines.append(plain[controller])
        tree.append(f"{cg['path']:<30} {procs:<10} {lines[0] if lines else ''}".rstrip())
        tree.extend(f"{'':41} {line}" for line in lines[1:])
    print("\n".join(tree))
    if status["holders"]:
        print("holders:")
    for holder in status["holders"]:
        ids = " ".join(map(str, holder["ids"]))
        guest = holder.get("guest", holder["type"])  # a daemon of an older release has none
        kind = holder["type"] if guest == holder["type"] else f"{holder['type']} ({guest})"
        print(f"  pid {holder['pid']:<8} {kind:<8} {holder['cgroup']:<24} {ids}")
    return 0


def _figures_line(status: dict, cg: dict, controller: str) -> str:
    """A controller's figures in a cgroup: per type, used/limit (the root's: of the capacity)
    and the refusals."""
    return f"{controller}: " + "  ".join(
        f"{name} {r['current']}/{r['capacity'] if cg['path'] == '/' else r['max']}"
        + (f" refused {r['events']}" if r["events"] else "")
        for name in status["capacities"] for r in [figures(status, cg, controller, name)])
