"""`encidfs exec`: run a command where /sys/fs/cgroup is an encidfs mount.

Software with /sys/fs/cgroup written into it (runc's cgroup v2 manager, for one) then works on
encidfs unchanged.  The command gets a private mount namespace of its own, in which the mount is
bound over /sys/fs/cgroup; the host's view is left as it was.  As root that is a mount
namespace; as another user, a user namespace around it too (the user is root in it only to
make the bind mount, and runs the command as itself).

Where seccomp user notification serves (seccomp.py), `encidfs exec` stays the command's parent
and answers its statfs(2) calls on the mount as cgroup2's; it forwards the signals that would
end it to the command, and exits with the command's status.

On a mount over a cgroup below the hierarchy's root (`--over DIR`), the command also gets a
cgroup namespace rooted at DIR, so that /proc/PID/cgroup of a process in the mount's tree says
its path in the mount.  A namespace's root is the cgroup of the task that makes it: a helper
process joins DIR, makes the namespace and holds it until the command has entered it
(`python -m encidfs.exec.namespace DIR -- ...`, run before the bind mount hides DIR).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from ..control.client import Client, ControlError
from ..control.protocol import OVER_XATTR
from ..host.mountinfo import cgroup2_mount_of
from ..host.release import kernel_release
from . import seccomp
from .cgroup_bpf import CgroupBpf

# Run by sh in the new namespaces: $0 is the mount, "$@" the command (and its own unshare).
_BIND = 'mount --bind "$0" /sys/fs/cgroup && exec "$@"'


class NamespaceError(Exception):
    """Why the command cannot be given its namespace; the message is for the user."""


def exec_with_cgroupfs(mount: str, argv: list[str], mounts: bool = False,
                       proc_cgroup: bool = False) -> None:
    """Replace this process by argv, run with `mount` as its /sys/fs/cgroup; with `mounts`,
    the mount tables show it as cgroup2 too; with `proc_cgroup`, /proc/PID/cgroup says the
    cgroup of the mount's standalone tree."""
    if shutil.which("unshare") is None:
        raise NamespaceError("unshare (util-linux) is needed")
    if not os.path.isdir("/sys/fs/cgroup"):
        raise NamespaceError("/sys/fs/cgroup is not a directory to mount over")
    outer = ["unshare", "--mount", "--propagation", "private"]
    inner: list[str] = []
    if os.geteuid() != 0:
        if not _user_namespaces_allowed():
            raise NamespaceError("this kernel does not let users make user namespaces "
                                 "(kernel.unprivileged_userns_clone, user.max_user_namespaces "
                                 "or kernel.apparmor_restrict_unprivileged_userns); run "
                                 "encidfs exec as root")
        outer.insert(1, "--map-root-user")
        inner = ["unshare", f"--map-user={os.geteuid()}", f"--map-group={os.getegid()}", "--"]
    chain = [*outer, "sh", "-c", _BIND, mount, *inner]
    over = _over(mount)
    below_root = _below_root(over)
    if below_root is not None:
        chain[len(outer):len(outer)] = [sys.executable, "-m", "encidfs.exec.namespace", below_root,
                                        "--"]
    cgroup_of = None
    if proc_cgroup:
        if over is not None:
            raise NamespaceError("--proc-cgroup is for the standalone tree: over a cgroup, "
                                 "/proc/PID/cgroup is the kernel's own")
        cgroup_of = _books(mount)
    if not seccomp.supported():
        if mounts or proc_cgroup:
            raise NamespaceError("--mounts and --proc-cgroup need seccomp user notification "
                                 "(x86_64, aarch64)")
        os.execvp(chain[0], [*chain, *argv])
    device = os.stat(mount).st_dev
    cgroup_bpf = None if over is None else CgroupBpf(device, over)
    sys.exit(_supervise(chain, argv, seccomp.Supervisor(-1, device, mounts, cgroup_of,
                                                        cgroup_bpf)))


# Signals that end a shell's foreground job: the command gets them, and decides.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _supervise(chain: list[str], argv: list[str], supervisor: seccomp.Supervisor) -> int:
    """Run chain + argv with the filter installed just before argv's exec, answer its
    notifications (the listener, once received, is the supervisor's) until it exits, and
    return its exit status as a shell would."""
    ours, theirs = socket.socketpair()
    options = [*(["--opens"] if supervisor.mounts or supervisor.cgroup_of else []),
               *(["--bpf"] if supervisor.cgroup_bpf else [])]
    command = subprocess.Popen(
        [*chain, sys.executable, "-m", "encidfs.exec.seccomp", str(theirs.fileno()), *options, "--",
         *argv], pass_fds=[theirs.fileno()])
    theirs.close()
    for signum in _FORWARDED:
        signal.signal(signum, lambda signum, frame: command.send_signal(signum))
    exited = os.pidfd_open(command.pid)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, exited)
        poller = select.poll()
        poller.register(exited, select.POLLIN)
        poller.register(ours, select.POLLIN)
        while True:
            ready = dict(poller.poll())  # a forwarded signal's EINTR is retried (PEP 475)
            if exited in ready:
                break
            if ours.fileno() in ready:  # the listener, once the filter is in place
                poller.unregister(ours)
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
                ours.close()
                for listener in fds:
                    stack.callback(os.close, listener)
                    supervisor.listener = listener
                    poller.register(listener, select.POLLIN)
            elif supervisor.listener in ready:
                supervisor.answer_one()
        status = command.wait()  # reaped: the filter is no longer the command's
        if supervisor.listener >= 0:
            _answer_those_left(supervisor)
    return 128 - status if status < 0 else status


# Since Linux 5.8 the listener hangs up once no process has the filter.
_HANGS_UP_SINCE = (5, 8)


def _answer_those_left(supervisor: seccomp.Supervisor) -> None:
    """Processes the command left running (a detached container) have the filter too: answer
    them from a process of its own, out of the caller's session, until none of them is left,
    so that exec returns the command's status now."""
    poller = select.poll()
    poller.register(supervisor.listener, select.POLLIN)
    if kernel_release() < _HANGS_UP_SINCE or not _still_used(poller.poll(0)):
        return
    if os.fork() != 0:
        return
    try:
        os.setsid()
        quiet = os.open(os.devnull, os.O_RDWR)
        for fd in range(3):
            os.dup2(quiet, fd)
        for signum in _FORWARDED:
            signal.signal(signum, signal.SIG_IGN)
        while _still_used(events := poller.poll()):
            if events:
                supervisor.answer_one()
    finally:
        os._exit(0)


def _still_used(events: list[tuple[int, int]]) -> bool:
    return not any(event & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, event in events)


def _books(mount: str) -> Callable[[int, int | None], str | None]:
    """cgroup_of(task, seen_by) from the daemon's books, over its control socket (connected
    now, while exec may still say why it cannot be)."""
    try:
        client = Client.connect(mount=mount)
    except OSError as error:
        raise NamespaceError(f"--proc-cgroup asks the daemon, whose control socket refuses: "
                             f"{error.strerror}") from None

    def cgroup_of(task: int, seen_by: int | None) -> str | None:
        nonlocal client
        try:
            return client.cgroup_of(task, seen_by)
        except ControlError:
            return None  # no such task: the kernel's answer is the one
        except OSError:  # the daemon restarted (its supervisor does that): once more
            client.close()
            client = Client.connect(mount=mount)
            return client.cgroup_of(task, seen_by)

    return cgroup_of


_CLONE_NEWCGROUP = 0x02000000
_libc = ctypes.CDLL(None, use_errno=True)


def _over(mount: str) -> str | None:
    """DIR, for a mount over DIR; None for the standalone tree."""
    try:
        return os.fsdecode(os.getxattr(mount, OVER_XATTR))
    except OSError:
        return None


def _below_root(over: str | None) -> str | None:
    """DIR, for a mount over a cgroup below its hierarchy's root; else None."""
    if over is None:
        return None
    hierarchy = cgroup2_mount_of(over)
    if hierarchy is None or (over == hierarchy.mountpoint and hierarchy.root == "/"):
        return None
    return over


def enter_cgroup_namespace(top: str) -> None:
    """Enter a new cgroup namespace rooted at cgroup `top`, without this process moving: a
    helper joins `top`, makes the namespace and holds it until it is entered.  Where `top`
    takes no process (it enables domain controllers), say so and go on in the host's."""
    said_r, said_w = os.pipe()
    hold_r, hold_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(said_r)
        os.close(hold_w)
        try:
            with open(os.path.join(top, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
            if _libc.unshare(_CLONE_NEWCGROUP) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            os.write(said_w, b"ok")
            os.read(hold_r, 1)  # until the command has entered the namespace
        except OSError as error:
            os.write(said_w, os.strerror(error.errno or errno.EIO).encode())
        os._exit(0)
    os.close(said_w)
    os.close(hold_r)
    said = os.read(said_r, 256)
    try:
        if said != b"ok":
            print(f"encidfs exec: no cgroup namespace at {top} ({said.decode()}): "
                  "/proc/PID/cgroup shows the host's paths", file=sys.stderr)
            return
        namespace = os.open(f"/proc/{helper}/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(namespace, _CLONE_NEWCGROUP) != 0:
                raise NamespaceError(f"setns: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(namespace)
    finally:
        os.close(hold_w)
        os.close(said_r)
        os.waitpid(helper, 0)


def main() -> None:
    """python -m encidfs.exec.namespace DIR -- CMD [ARGS...]: CMD in a cgroup namespace at DIR."""
    enter_cgroup_namespace(sys.argv[1])
    argv = sys.argv[3:]
    os.execvp(argv[0], argv)


def _user_namespaces_allowed() -> bool:
    # Ubuntu's AppArmor restriction lets the namespace be made but without the capability to
    # mount in it.
    for path, allowed in (("/proc/sys/kernel/unprivileged_userns_clone", lambda v: v != "0"),
                          ("/proc/sys/user/max_user_namespaces", lambda v: v != "0"),
                          ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
                           lambda v: v == "0")):
        try:
            with open(path) as f:
                if not allowed(f.read().strip()):
                    return False
        except OSError:
            pass
    return True


if __name__ == "__main__":
    main()
