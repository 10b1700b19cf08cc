"""The encidfs command: mount and umount here, the client commands in commands.py."""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources

from ..control.protocol import PID_XATTR
from ..daemon import config as configuration
from ..daemon import controllers, supervisor
from ..exec.namespace import NamespaceError, exec_with_cgroupfs
from ..host.mount import FSTYPE, fuse_problem, mounted_fstype, unmount
from ..host.runtime import RuntimeDirError
from ..procs.procfs import alive, read_stat
from ..state.store import StateError
from . import commands as client_commands
from . import mount_helper

MOUNT_TIMEOUT = 10.0
UMOUNT_TIMEOUT = 10.0


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


def _parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The command line's parser, and the names of its commands."""
    parser = argparse.ArgumentParser(prog="encidfs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    mount = commands.add_parser("mount", help="mount a cgroup v2 file system with encids")
    mount.add_argument("mountpoint")
    mount.add_argument("--capacity", action="append", default=[], metavar="TYPE=N",
                       help="a resource type and how many IDs it has (repeatable)")
    mount.add_argument("--asids", type=int, metavar="N", help="ASIDs on this host (as KVM)")
    mount.add_argument("--min-sev-asid", type=int, metavar="M",
                       help="lowest SEV ASID; the ones below it are SEV-ES ASIDs")
    mount.add_argument("--snp-asids", type=int, metavar="N",
                       help="SEV-SNP guests take the N lowest SEV-ES IDs, SEV-ES guests the "
                            "rest (kvm_amd's ciphertext_hiding_asids; 0: they share them)")
    mount.add_argument("--config", metavar="FILE.toml")
    mount.add_argument("--state", metavar="FILE",
                       help="keep the state in this file (and FILE.log beside it) and restore "
                            "it on mount")
    mount.add_argument("--over", metavar="DIR",
                       help="show DIR's cgroup v2 tree, the encryption-ID controllers added; "
                            "membership is the kernel's (default: a standalone tree)")
    mount.add_argument("--tracking", choices=("auto", "scan"), default="auto",
                       help="how forks are followed: the proc connector when the daemon may "
                            "use it (auto), or scanning /proc (scan)")
    mount.add_argument("--max-cgroups", type=int, metavar="N",
                       help="how many cgroups (live and dying) the daemon keeps at most; "
                            f"mkdir beyond is EAGAIN (default {configuration.DEFAULT_MAX_CGROUPS})")
    mount.add_argument("--user-share", type=int, metavar="PERCENT",
                       help="how much of each thing the daemon keeps (cgroups, xattrs, "
                            "replies) one user other than the mount's owner may make it keep "
                            f"(default {configuration.DEFAULT_USER_SHARE})")
    mount.add_argument("--control", metavar="PATH",
                       help="the control socket (default: derived from the mountpoint)")
    mount.add_argument("--controllers", metavar="NAMES",
                       help="the controllers offered, comma-separated (default encids,misc)")
    mount.add_argument("--controller-module", action="append", default=[], metavar="MODULE",
                       help="load a module (a name or a FILE.py) that registers controllers "
                            "(encidfs.daemon.controllers.register), offered when named in "
                            "--controllers (repeatable)")
    mount.add_argument("--control-mode", metavar="MODE",
                       help="the control socket's mode, in octal (default 0600: the owner only)")
    mount.add_argument("--control-group", metavar="GROUP",
                       help="the control socket's group (with --control-mode 0660, its members "
                            "may allocate for processes placed in their cgroups)")
    mount.add_argument("--kernel-interface", metavar="VERSION",
                       help="the misc files and rules of Linux VERSION (5.13 or later, e.g. "
                            "5.14, 6.1; default: the newest)")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                       help="FUSE mount options, comma-separated (e.g. allow_other)")
    mount.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground and log to stderr")
    mount.add_argument("--metrics", metavar="ADDRESS:PORT",
                       help="serve Prometheus metrics on http://ADDRESS:PORT/metrics")
    mount.add_argument("--debug", action="store_true", help="log debug messages")
    mount.add_argument("--quiet", "-q", action="store_true",
                       help="print nothing once mounted (as mount(8) helpers do)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--supervise", action="store_true", help=argparse.SUPPRESS)

    umount = commands.add_parser("umount", help="unmount and stop the daemon")
    umount.add_argument("mountpoint")

    unit = commands.add_parser("unit", help="print a systemd unit that mounts encidfs at boot")
    unit.add_argument("--mountpoint", default=client_commands.DEFAULT_MOUNT,
                      help=f"where it mounts (default {client_commands.DEFAULT_MOUNT})")

    run_in = commands.add_parser("exec", help="run a command with the mount as /sys/fs/cgroup")
    run_in.add_argument("--mount", metavar="MNT",
                        help=f"the encidfs mountpoint (default {client_commands.DEFAULT_MOUNT})")
    run_in.add_argument("--mounts", action="store_true",
                        help="show the mount as cgroup2 in the command's /proc/*/mounts and "
                             "mountinfo (every open goes through encidfs exec then)")
    run_in.add_argument("--proc-cgroup", action="store_true",
                        help="on the standalone tree, /proc/PID/cgroup says the cgroup of "
                             "the mount's (every open goes through encidfs exec then)")
    run_in.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    client_commands.add_parsers(commands)
    return parser, set(commands.choices)


def main(argv: list[str] | None = None) -> int:
    parser, command_names = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if mount_helper.is_helper_call(os.path.basename(sys.argv[0]), argv, command_names):
        try:
            helper_argv = mount_helper.to_cli(argv)
        except mount_helper.HelperError as error:
            print(f"encidfs: {error}", file=sys.stderr)
            return 1
        if helper_argv is None:
            return 0  # mount -f: nothing to do
        argv = helper_argv
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "umount":
            return _umount(args.mountpoint)
        if args.command == "exec":
            return _exec(args)
        if args.command == "unit":
            return _unit(args.mountpoint)
        return client_commands.run_command(args)
    except (CliError, configuration.ConfigError, NamespaceError) as error:
        print(f"encidfs: {error}", file=sys.stderr)
        return 1


# -- mount ------------------------------------------------------------------------------------

def _mount(args: argparse.Namespace) -> int:
    options = [o for group in args.options for o in group.split(",") if o]
    for module in args.controller_module:  # before the names in --controllers are checked
        try:
            controllers.load_module(module)
        except (ImportError, OSError) as error:
            raise configuration.ConfigError(f"--controller-module {module}: {error}") from None
    config = configuration.load(args.config, args.capacity, args.asids, args.min_sev_asid,
                                options, args.control, args.state, args.max_cgroups,
                                args.control_mode, args.control_group, args.controllers,
                                args.over, args.user_share,
                                kernel_interface=args.kernel_interface,
                                snp_asids=args.snp_asids)
    config.proc_connector = args.tracking == "auto"
    if args.metrics:
        config.metrics = _metrics_address(args.metrics)
    mountpoint = os.path.abspath(args.mountpoint)
    _check_mountpoint(mountpoint)
    _check_fuse(config.fuse_options)
    if args.supervise:
        return _supervise(args)
    if args.foreground or args.ready_fd is not None:
        return _serve(mountpoint, config, args)
    return _start_daemon(mountpoint, args)


def _metrics_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--metrics {text!r} is not ADDRESS:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_mountpoint(mountpoint: str) -> None:
    if mounted_fstype(mountpoint) == FSTYPE and not _answers(mountpoint):
        _clean_dead_mount(mountpoint)
    if not os.path.exists(mountpoint):
        raise CliError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise CliError(f"mountpoint {mountpoint} is not a directory")
    if mounted_fstype(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise CliError(f"mountpoint {mountpoint} is not empty")


def _answers(mountpoint: str) -> bool:
    """False for a FUSE mount whose daemon is gone ("Transport endpoint is not connected", or
    "Software caused connection abort" when requests were pending)."""
    try:
        os.statvfs(mountpoint)  # always asks the daemon; stat() may be answered from a cache
    except OSError as error:
        return error.errno not in (errno.ENOTCONN, errno.ECONNABORTED)
    return True


def _clean_dead_mount(mountpoint: str) -> None:
    result = unmount(mountpoint, lazy=True)
    if result.returncode != 0:
        raise CliError(f"cannot clean up the dead mount on {mountpoint}: {result.stderr.strip()}")


def _check_fuse(options: list[str]) -> None:
    problem = fuse_problem(options)
    if problem:
        raise CliError(problem)


def _serve(mountpoint: str, config: configuration.Config, args: argparse.Namespace) -> int:
    from ..daemon import serve  # pyfuse3 and prometheus_client load only where they are needed
    from ..daemon.metrics import MetricsError

    _setup_logging(args.foreground, args.debug)
    ready_fd = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            _tell_ready(ready_fd)

    try:
        serve.run(mountpoint, config, ready)
    except RuntimeError as error:  # pyfuse3 reports a failed mount this way
        raise CliError(f"cannot mount {mountpoint}: {error}") from None
    except (StateError, RuntimeDirError, MetricsError) as error:
        raise CliError(str(error)) from None
    return 0


def _unit(mountpoint: str) -> int:
    """The unit shipped with the package, for this installation's interpreter."""
    template = resources.files("encidfs").joinpath("encidfs.service").read_text()
    program = f"{sys.executable} -m encidfs"
    sys.stdout.write(template.replace("@ENCIDFS@", program)
                     .replace("@MOUNTPOINT@", os.path.abspath(mountpoint)))
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """The supervisor (see daemon/supervisor.py), between `encidfs mount` and the daemon."""
    _setup_logging(False, args.debug)
    daemon_argv = [sys.executable, "-m", "encidfs", *_forwarded(args)]
    return supervisor.supervise(daemon_argv, lambda: _tell_ready(args.ready_fd))


def _tell_ready(ready_fd: int) -> None:
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    # The parent stops reading our stderr once we are up: errors before this reach it.
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stderr.fileno())


def _setup_logging(foreground: bool, debug: bool) -> None:
    handler: logging.Handler
    if foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("encidfs[%(process)d] %(levelname)s %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("encidfs[%(process)d]: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])


def _start_daemon(mountpoint: str, args: argparse.Namespace) -> int:
    """Run the daemon under its supervisor, in their own session, and return once the file
    system answers (as mount(8))."""
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "encidfs", *_forwarded(args), "--supervise",
            "--ready-fd", str(write_end)]
    process = subprocess.Popen(argv, pass_fds=[write_end], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        # "ready", or end of file when the daemon gave up
        said = ready.read() if select.select([ready], [], [], MOUNT_TIMEOUT)[0] else b""
    if said.strip() != b"ready" and process.poll() is None:
        process.kill()
    if said.strip() != b"ready":
        process.wait()
        message = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
        raise CliError(message.removeprefix("encidfs: ")
                       or f"the daemon exited ({process.returncode})")
    if process.stderr:
        process.stderr.close()
    _wait_until(lambda: mounted_fstype(mountpoint) == FSTYPE, MOUNT_TIMEOUT,
                f"{mountpoint} did not appear")
    daemon = int(os.getxattr(mountpoint, PID_XATTR))
    if not args.quiet:
        print(f"encidfs mounted on {mountpoint} (daemon pid {daemon}, supervisor pid "
              f"{process.pid})")
    return 0


# Options the supervised daemon is given as the user gave them, and whether each is a path
# (made absolute: the daemon may not share the caller's working directory).
_FORWARDED = (("--asids", False), ("--min-sev-asid", False), ("--snp-asids", False),
              ("--config", False), ("--control", False), ("--controllers", False),
              ("--control-mode", False), ("--control-group", False), ("--state", True),
              ("--over", True), ("--max-cgroups", False), ("--user-share", False),
              ("--metrics", False), ("--kernel-interface", False), ("--tracking", False))


def _forwarded(args: argparse.Namespace) -> list[str]:
    argv = ["mount", args.mountpoint]
    for capacity in args.capacity:
        argv += ["--capacity", capacity]
    for option, is_path in _FORWARDED:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            argv += [option, os.path.abspath(value) if is_path else str(value)]
    for module in args.controller_module:
        argv += ["--controller-module", os.path.abspath(module) if module.endswith(".py")
                 else module]
    for option in args.options:
        argv += ["-o", option]
    if args.debug:
        argv.append("--debug")
    return argv


# -- exec -------------------------------------------------------------------------------------

def _exec(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mount or client_commands.DEFAULT_MOUNT)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("exec needs a command after --")
    if mounted_fstype(mountpoint) != FSTYPE:
        raise CliError(f"{mountpoint} is not an encidfs mount")
    exec_with_cgroupfs(mountpoint, argv, args.mounts, args.proc_cgroup)
    return 127  # not reached: the command took this process's place


# -- umount -----------------------------------------------------------------------------------

def _umount(target: str) -> int:
    mountpoint = os.path.abspath(target)
    if mounted_fstype(mountpoint) != FSTYPE:
        raise CliError(f"{mountpoint} is not an encidfs mount")
    try:
        pid = int(os.getxattr(mountpoint, PID_XATTR))
    except OSError:
        pid = None  # a daemon that no longer answers: unmounting is all there is to do
    waited = [pid, _supervisor_of(pid)] if pid is not None else []
    result = unmount(mountpoint)
    if result.returncode != 0:
        raise CliError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    for process in waited:
        if process is not None:
            _wait_until(lambda: not _alive(process), UMOUNT_TIMEOUT,
                        f"encidfs process {process} did not stop")
    return 0


def _supervisor_of(pid: int) -> int | None:
    """The supervisor that runs the daemon `pid`, if one does: the daemon's parent."""
    try:
        parent = read_stat(pid).ppid
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    return parent if b"encidfs" in argv and b"--supervise" in argv else None


# -- helpers ----------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether the process runs: its zombie, not ours to reap, does not; another user's,
    which /proc may hide (hidepid), does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return alive(pid)


def _wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() > deadline:
            raise CliError(message)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)

