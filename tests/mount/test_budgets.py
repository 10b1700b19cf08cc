"""Per-user budgets: a user who fills every budget she can (cgroups, xattr names and bytes,
control connections, replies waiting for her) leaves another user, and root, served.

The mount keeps 5,000 cgroups and gives each user 1% of every budget (--user-share 1), so
that her share of each is quick to fill: 50 cgroups, 2,621 xattr names, 671,088 bytes of
xattrs, 10 connections, 671,088 bytes of replies.
"""

from __future__ import annotations

import json
import os
import subprocess

from mountutil import DEADLINE, User, user_python, write

from encidfs.control.client import Client

# Run as the first user, standard library only: fills her budgets under /a, saying what each
# took, as JSON.
FILL = r"""
import errno, json, os, socket, sys

mnt, control = sys.argv[1], sys.argv[2]
took = {}

def count(action):
    done = 0
    while True:
        try:
            action(done)
        except OSError as error:
            return done, errno.errorcode[error.errno]
        except IndexError:  # more taken than her cgroups have nodes for: say so
            return done, "no node left"
        done += 1

took["cgroups"] = count(lambda i: os.mkdir(f"{mnt}/a/{i}"))
# Nodes she may set xattrs on (write access): her cgroups' directories and writable files.
writable = [f"{mnt}/a/{i}/{name}" for i in range(took["cgroups"][0])
            for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control",
                         "cgroup.max.depth", "cgroup.max.descendants", "cgroup.freeze")]
took["xattr names"] = count(lambda i: os.setxattr(writable[i // 100], b"user.%d" % i, b""))
# Bytes: values of names she has (no new name), two a node (kernfs takes 128 KiB a node).
took["xattr bytes"] = count(lambda i: os.setxattr(writable[i // 2],
                                                  b"user.%d" % (i // 2 * 100 + i % 2),
                                                  b"x" * 60000))
held = []

def status_waiting(_):
    # A status she does not read: the daemon holds what her socket's buffer does not take.
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(control)
    held.append(connection)
    connection.sendall(b'{"op": "status"}\n')
    start = connection.recv(64)
    if start.startswith(b'{"ok":false'):
        raise OSError(getattr(errno, json.loads(start + connection.recv(4096))["errno"]), "")

took["statuses waiting"] = count(status_waiting)

def connect(_):
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(control)
    held.append(connection)
    connection.sendall(b'{"op": "cgroup", "pid": %d}\n' % os.getpid())
    reply = json.loads(connection.makefile("rb").readline())
    if not reply["ok"]:
        raise OSError(getattr(errno, reply["errno"]), reply["error"])

took["connections"] = count(connect)
print(json.dumps(took), flush=True)
sys.stdin.read()  # holds it all until the test is done
"""


def delegate(mnt, name: str, user: User) -> None:
    cgroup = mnt / name
    cgroup.mkdir()
    for path in (cgroup, cgroup / "cgroup.procs", cgroup / "cgroup.subtree_control",
                 cgroup / "cgroup.threads"):
        os.chown(path, user.uid, user.gid)


def test_a_user_at_every_limit_leaves_the_others_served(mount_encidfs, user, second_user,
                                                       traversable):
    mnt = traversable(mount_encidfs("--max-cgroups", "5000", "--user-share", "1",
                                    "--control-mode", "0666"))
    control = os.getxattr(mnt, "user.encidfs.control").decode()
    write(mnt / "cgroup.subtree_control", "+encids")
    delegate(mnt, "a", user)
    delegate(mnt, "b", second_user)
    for index in range(2000):  # the owner's (beyond any user's share): a large status
        (mnt / f"owner{index}").mkdir()
    with Client.connect(control=control) as client:
        assert len(json.dumps(client.status())) > 400_000  # more than a socket's buffer
    filler = subprocess.Popen([*user.setpriv(), user_python(), "-c", FILL, str(mnt), control],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        took = json.loads(filler.stdout.readline())
        assert took["cgroups"] == [50, "EAGAIN"], took
        assert took["xattr names"] == [2621, "ENOSPC"], took
        # 671,088 bytes, less the names' own 22,000-odd: 10 values of 60,000.
        assert took["xattr bytes"] == [10, "ENOSPC"]
        assert took["statuses waiting"][1] == "ENOBUFS"
        # Her connections, the one refused ENOBUFS among them.
        assert took["statuses waiting"][0] + 1 + took["connections"][0] == 10
        assert took["connections"][1] == "EAGAIN"
        # The second user, and root, are served.
        check = ("import os, socket, sys\n"
                 "mnt, control = sys.argv[1], sys.argv[2]\n"
                 "os.mkdir(f'{mnt}/b/x')\n"
                 "os.setxattr(f'{mnt}/b/x/cgroup.procs', b'user.mine', b'y' * 60000)\n"
                 "connection = socket.socket(socket.AF_UNIX)\n"
                 "connection.connect(control)\n"
                 "connection.sendall(b'{\"op\": \"status\"}\\n')\n"
                 "print(connection.makefile('rb').readline()[:11].decode())\n")
        second = subprocess.run([*second_user.setpriv(), user_python(), "-c", check, str(mnt),
                                 control], capture_output=True, text=True, timeout=DEADLINE)
        assert second.stdout == '{"ok":true,\n', second.stderr
        (mnt / "root-made").mkdir()
        os.setxattr(mnt / "root-made", "user.mine", b"z" * 60000)
        with Client.connect(control=control) as client:
            assert "/root-made" in {entry["path"] for entry in client.status()["cgroups"]}
    finally:
        filler.communicate("")
