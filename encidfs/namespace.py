"""`encidfs exec`: run a command where /sys/fs/cgroup is an encidfs mount.

Software with /sys/fs/cgroup written into it (runc's cgroup v2 manager, for one) then works on
encidfs unchanged.  The command gets a private mount namespace of its own, in which the mount is
bound over /sys/fs/cgroup; the host's view is left as it was.  As root that is a mount
namespace; as another user, a user namespace around it too (the user is root in it only to
make the bind mount, and runs the command as itself).

Where seccomp user notification serves (seccomp.py), `encidfs exec` stays the command's parent
and answers its statfs(2) calls on the mount as cgroup2's; it forwards the signals that would
end it to the command, and exits with the command's status.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys

from . import seccomp

# Run by sh in the new namespaces: $0 is the mount, "$@" the command (and its own unshare).
_BIND = 'mount --bind "$0" /sys/fs/cgroup && exec "$@"'


class NamespaceError(Exception):
    """Why the command cannot be given its namespace; the message is for the user."""


def exec_with_cgroupfs(mount: str, argv: list[str], mounts: bool = False) -> None:
    """Replace this process by argv, run with `mount` as its /sys/fs/cgroup; with `mounts`,
    the mount tables show it as cgroup2 too."""
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
    if not seccomp.supported():
        if mounts:
            raise NamespaceError("--mounts needs seccomp user notification (x86_64, aarch64)")
        os.execvp(chain[0], [*chain, *argv])
    sys.exit(_supervise(chain, argv, os.stat(mount).st_dev, mounts))


# Signals that end a shell's foreground job: the command gets them, and decides.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _supervise(chain: list[str], argv: list[str], device: int, mounts: bool) -> int:
    """Run chain + argv with the filter installed just before argv's exec, answer its
    notifications until it exits, and return its exit status as a shell would."""
    ours, theirs = socket.socketpair()
    options = ["--mounts"] if mounts else []
    command = subprocess.Popen(
        [*chain, sys.executable, "-m", "encidfs.seccomp", str(theirs.fileno()), *options, "--",
         *argv], pass_fds=[theirs.fileno()])
    theirs.close()
    for signum in _FORWARDED:
        signal.signal(signum, lambda signum, frame: command.send_signal(signum))
    exited = os.pidfd_open(command.pid)
    supervisor = None
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, exited)
        poller = select.poll()
        poller.register(exited, select.POLLIN)
        poller.register(ours, select.POLLIN)
        while True:
            ready = dict(_poll(poller))
            if exited in ready:
                break
            if ours.fileno() in ready:  # the listener, once the filter is in place
                poller.unregister(ours)
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
                ours.close()
                for listener in fds:
                    stack.callback(os.close, listener)
                    supervisor = seccomp.Supervisor(listener, device)
                    poller.register(listener, select.POLLIN)
            elif supervisor is not None and supervisor.listener in ready:
                supervisor.answer_one()
    status = command.wait()
    return 128 - status if status < 0 else status


def _poll(poller: select.poll) -> list[tuple[int, int]]:
    while True:
        try:
            return poller.poll()
        except InterruptedError:
            continue


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
