"""`encidfs exec`: run a command where /sys/fs/cgroup is an encidfs mount.

Software with /sys/fs/cgroup written into it (runc's cgroup v2 manager, for one) then works on
encidfs unchanged.  The command gets a private mount namespace of its own, in which the mount is
bound over /sys/fs/cgroup; the host's view is left as it was.  As root that is a mount
namespace; as another user, a user namespace around it too (the user is root in it only to
make the bind mount, and runs the command as itself).
"""

from __future__ import annotations

import os
import shutil

# Run by sh in the new namespaces: $0 is the mount, "$@" the command (and its own unshare).
_BIND = 'mount --bind "$0" /sys/fs/cgroup && exec "$@"'


class NamespaceError(Exception):
    """Why the command cannot be given its namespace; the message is for the user."""


def exec_with_cgroupfs(mount: str, argv: list[str]) -> None:
    """Replace this process by argv, run with `mount` as its /sys/fs/cgroup."""
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
    os.execvp(outer[0], [*outer, "sh", "-c", _BIND, mount, *inner, *argv])


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
