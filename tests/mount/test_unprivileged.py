"""A user's own mount, for real: as the test user and as nobody, at the same time, in a private
mount namespace where /dev/fuse is a 0666 node bound over the host's (which stays as it is).

Each user runs USER_SCRIPT: it mounts encidfs itself (`encidfs mount`, as a user would), reports
its socket, waits to be told to go on, and then makes cgroups, enables controllers, sets
limits, moves its own processes, allocates, is refused by a limit, freezes and kills, and
unmounts.  Meanwhile the other user tries the first one's socket and mount, and must be kept
out of both.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mountutil import DEADLINE, NOBODY, REPO, SITE, USER_HELPERS, User, user_python

USER_SCRIPT = USER_HELPERS + r"""
import json, os, select, subprocess, sys, time
from encidfs.client import Client, ControlError

mnt = sys.argv[1]
encidfs = [sys.executable, "-m", "encidfs"]
out = {"uid": os.getuid()}

mounted = subprocess.run([*encidfs, "mount", mnt], capture_output=True, text=True)
out["mount"] = mounted.returncode, mounted.stderr.strip()
out["socket"] = os.getxattr(mnt, "user.encidfs.control").decode()
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the other user has had its go at this mount

root = os.stat(mnt)
out["root"] = [root.st_uid, oct(root.st_mode & 0o777), os.stat(mnt + "/cgroup.procs").st_uid]
out["enable"] = write(mnt + "/cgroup.subtree_control", "+encids +misc")
os.mkdir(mnt + "/a")
out["limit"] = write(mnt + "/a/encids.sev.max", "2")
sleeper = subprocess.Popen(["sleep", "600"])
out["move"] = write(mnt + "/a/cgroup.procs", str(sleeper.pid))
out["members"] = read(mnt + "/a/cgroup.procs").split()
out["foreign move"] = write(mnt + "/a/cgroup.procs", "1")  # init: not ours to signal
with Client.connect(mount=mnt) as client:
    out["allocated"] = list(client.allocate("sev", pid=sleeper.pid))
    try:
        client.allocate("sev", 2, pid=sleeper.pid)
        out["refused"] = None
    except ControlError as error:
        out["refused"] = [error.errno, error.cgroup, error.controller]
    status = client.status()
    out["tracking"] = status["tracking"]
    out["limitations"] = [line.split(":")[0] for line in status["limitations"]]
out["current"] = read(mnt + "/a/misc.current")
out["freeze"] = write(mnt + "/a/cgroup.freeze", "1")
until(lambda: "frozen 1" in read(mnt + "/a/cgroup.events"))
out["thaw"] = write(mnt + "/a/cgroup.freeze", "0")
out["kill"] = write(mnt + "/a/cgroup.kill", "1")
out["killed"] = sleeper.wait(timeout=10)
until(lambda: read(mnt + "/encids.sev.stat") == "total 509\nused 0\n")
unmounted = subprocess.run([*encidfs, "umount", mnt], capture_output=True, text=True)
out["umount"] = unmounted.returncode, unmounted.stderr.strip()
out["gone"] = not os.listdir(mnt)
print(json.dumps(out), flush=True)
"""

INTRUDER_SCRIPT = r"""
import json, os, socket, sys
out = {}
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
    out["socket"] = "connected"
except OSError as error:
    out["socket"] = os.strerror(error.errno)
try:
    os.listdir(sys.argv[2])
    out["mount"] = "listed"
except OSError as error:
    out["mount"] = os.strerror(error.errno)
print(json.dumps(out))
"""


@dataclass
class Namespace:
    """A mount namespace of its own, kept by a process, with a usable /dev/fuse."""

    pid: int
    base: Path  # a directory every user may traverse

    def argv(self, user: User, script: str, *args: str) -> list[str]:
        """Run a Python script as `user` inside the namespace, with encidfs importable."""
        return ["nsenter", f"--target={self.pid}", "--mount", *user.setpriv(), "env", "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin", f"PYTHONPATH={REPO}:{SITE}",
                user_python(), "-c", script, *args]


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is needed")
    base = Path(tempfile.mkdtemp(prefix="encidfs-unprivileged-"))
    base.chmod(0o755)
    node = base / "fuse"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(10, 229))
    node.chmod(0o666)
    # The namespace starts with copies of the mounts there are, other tests' encidfs mounts
    # among them: unmounted here, so that those daemons exit when their tests unmount them.
    keeper = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" /dev/fuse && { umount -a -l -t fuse.encidfs || true; } '
         '&& echo ready && exec sleep infinity', str(node)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout.readline() == "ready\n"
        yield Namespace(keeper.pid, base)
    finally:
        keeper.kill()
        keeper.wait()
        shutil.rmtree(base, ignore_errors=True)


def user_mountpoint(namespace: Namespace, user: User, name: str = "mnt") -> Path:
    mnt = namespace.base / f"{name}-{user.uid}"
    mnt.mkdir()
    os.chown(mnt, user.uid, user.gid)
    return mnt


def test_two_users_each_mount_their_own_and_neither_reaches_the_other(namespace, user):
    nobody = User(NOBODY, NOBODY, NOBODY)
    if user.uid == NOBODY:
        pytest.skip("needs a second user besides nobody (useradd)")
    runs = {}
    try:
        for who in (user, nobody):
            mnt = user_mountpoint(namespace, who)
            runs[who.uid] = (mnt, subprocess.Popen(namespace.argv(who, USER_SCRIPT, str(mnt)),
                                                   stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, text=True))
        ready = {uid: json.loads(process.stdout.readline()) for uid, (_, process)
                 in runs.items()}
        for uid, first in ready.items():
            assert first["mount"] == [0, ""], first
            assert first["socket"].startswith(f"/tmp/encidfs-{uid}/encidfs-control/")
        # nobody tries the test user's socket and mount, while both are up.
        intruder = subprocess.run(
            namespace.argv(nobody, INTRUDER_SCRIPT, ready[user.uid]["socket"],
                           str(runs[user.uid][0])),
            capture_output=True, text=True, timeout=DEADLINE)
        assert json.loads(intruder.stdout) == {"socket": "Permission denied",
                                               "mount": "Permission denied"}, intruder.stderr
        for _, process in runs.values():
            process.stdin.write("go on\n")
            process.stdin.flush()
        results = {uid: json.loads(process.stdout.readline() or "{}") for uid, (_, process)
                   in runs.items()}
    finally:
        for mnt, process in runs.values():
            process.kill()
            process.wait()
            subprocess.run(["nsenter", f"--target={namespace.pid}", "--mount", "umount", "-l",
                            str(mnt)], capture_output=True)
    for uid, out in results.items():
        assert out["uid"] == uid
        assert out["root"] == [uid, "0o755", uid]  # the hierarchy is the user's
        assert (out["enable"], out["limit"], out["move"]) == ("OK", "OK", "OK")
        assert len(out["members"]) == 1
        assert out["foreign move"] == "Operation not permitted"
        assert out["allocated"] == [1]
        assert out["refused"] == [16, "/a", "encids"]  # EBUSY by /a's limit of 2
        assert out["current"] == "sev 1\nsev_es 0\n"
        # Linux 6.6 opened the proc connector to users; where it is closed, status says so.
        connector = [] if out["tracking"] == "proc connector" else [
            "the proc connector is closed to this daemon"]
        assert out["limitations"] == [*connector,
                                      "truncating read-only files needs CAP_DAC_OVERRIDE"]
        assert (out["freeze"], out["thaw"], out["kill"], out["killed"]) == ("OK", "OK", "OK", -9)
        assert out["umount"] == [0, ""] and out["gone"]


OWNER_SCRIPT = r"""
import json, os, subprocess, sys
from encidfs.client import Client

mnt, holder = sys.argv[1], int(sys.argv[2])
encidfs = [sys.executable, "-m", "encidfs"]
out = {}
mounted = subprocess.run([*encidfs, "mount", mnt], capture_output=True, text=True)
out["mount"] = mounted.returncode, mounted.stderr.strip()
try:
    os.kill(holder, 0)
    out["signal"] = "OK"
except OSError as error:
    out["signal"] = os.strerror(error.errno)
with Client.connect(mount=mnt) as client:  # in the root cgroup, which only the owner charges
    allocation = client.allocate("sev", count=2, pid=holder)
    out["allocated"] = [list(allocation), allocation.holder, allocation.cgroup]
    client.free(list(allocation), pid=holder)
    out["holders"] = client.status()["holders"]
unmounted = subprocess.run([*encidfs, "umount", mnt], capture_output=True, text=True)
out["umount"] = unmounted.returncode, unmounted.stderr.strip()
print(json.dumps(out), flush=True)
"""


def test_a_users_mount_owner_acts_for_another_users_process(namespace, user, second_user,
                                                             procs):
    """The mount's owner may always, even for a process it may not signal."""
    holder = procs.start(["sleep", "600"], user=second_user.uid, group=second_user.gid,
                         extra_groups=[])
    mnt = user_mountpoint(namespace, user, "owner")
    try:
        done = subprocess.run(namespace.argv(user, OWNER_SCRIPT, str(mnt), str(holder.pid)),
                              capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["nsenter", f"--target={namespace.pid}", "--mount", "umount", "-l",
                        str(mnt)], capture_output=True)
    assert json.loads(done.stdout or "{}") == {
        "mount": [0, ""], "signal": "Operation not permitted",
        "allocated": [[1, 2], holder.pid, "/"], "holders": [], "umount": [0, ""],
    }, done.stderr[-3000:]


@pytest.mark.slow
def test_the_example_project_passes_as_a_user_with_only_the_plugin(namespace, user):
    """tests/example uses nothing but the installed plugin; as the test user it mounts, runs
    holders, restarts and runs under `encidfs exec` (a user namespace) by itself."""
    example = REPO / "tests" / "example"
    done = subprocess.run(
        [*namespace.argv(user, "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))",
                         "-q", "-p", "no:cacheprovider", str(example))],
        capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]


def test_exec_as_a_user_where_user_namespaces_are_refused_says_so(daemon, user, tmp_path):
    """The kernel's setting is seen through a private mount namespace in which
    /proc/sys/user/max_user_namespaces reads 0."""
    zero = tmp_path / "zero"
    zero.write_text("0\n")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" /proc/sys/user/max_user_namespaces && exec "$@"', str(zero),
         *user.setpriv(), "env", "-i", f"PYTHONPATH={REPO}:{SITE}", user_python(),
         "-m", "encidfs", "exec", "--mount", str(daemon.path), "--", "true"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 1
    assert done.stderr.startswith("encidfs: this kernel does not let users make user namespaces")
    assert done.stderr.count("\n") == 1


OVER_SCRIPT = USER_HELPERS + r"""
import json, subprocess, sys
from encidfs.client import Client, ControlError

mnt, top = sys.argv[1], sys.argv[2]
encidfs = [sys.executable, "-m", "encidfs"]
out = {}

mounted = subprocess.run([*encidfs, "mount", mnt, "--over", top, "--capacity", "sev=4"],
                         capture_output=True, text=True)
out["mount"] = mounted.returncode, mounted.stderr.strip()
out["enable"] = write(mnt + "/cgroup.subtree_control", "+encids")
os.mkdir(mnt + "/a")
out["owner"] = os.stat(top + "/a").st_uid == os.getuid()
out["limit"] = write(mnt + "/a/encids.sev.max", "1")
sleeper = subprocess.Popen(["sleep", "600"])
out["move"] = write(mnt + "/a/cgroup.procs", str(sleeper.pid))
out["kernel"] = read(f"/proc/{sleeper.pid}/cgroup").strip().endswith("/a")
out["init"] = write(mnt + "/a/cgroup.procs", "1")  # from the root cgroup: not the user's
with Client.connect(mount=mnt) as client:
    out["allocated"] = list(client.allocate("sev", pid=sleeper.pid))
    try:
        client.allocate("sev", pid=sleeper.pid)
        out["refused"] = None
    except ControlError as error:
        out["refused"] = [error.errno, error.cgroup]
out["freeze"] = write(mnt + "/a/cgroup.freeze", "1")
until(lambda: "frozen 1" in read(top + "/a/cgroup.events"))
out["kill"] = write(mnt + "/a/cgroup.kill", "1")
out["killed"] = sleeper.wait(timeout=10)
until(lambda: read(mnt + "/encids.sev.stat") == "total 4\nused 0\n")
os.rmdir(mnt + "/a")
out["removed"] = not os.path.exists(top + "/a")
unmounted = subprocess.run([*encidfs, "umount", mnt], capture_output=True, text=True)
out["umount"] = unmounted.returncode, unmounted.stderr.strip()
print(json.dumps(out), flush=True)
"""


def test_a_user_mounts_over_a_subtree_chowned_to_them(namespace, user, scratch):
    """A directory of the kernel's hierarchy chowned to the user: the user's own daemon mounts
    over it, and the user works in it within the kernel's rules."""
    (scratch / "home").mkdir()
    for directory, _, files in os.walk(scratch):
        for name in ["", *files]:
            os.chown(os.path.join(directory, name), user.uid, user.gid)
    mnt = user_mountpoint(namespace, user, "over")
    # The user's processes start in the subtree (a systemd unit's would), below its top.
    argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(scratch / "home" / "cgroup.procs"),
            *namespace.argv(user, OVER_SCRIPT, str(mnt), str(scratch))]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["nsenter", f"--target={namespace.pid}", "--mount", "umount", "-l",
                        str(mnt)], capture_output=True)
    out = json.loads(done.stdout or "{}")
    assert out == {
        "mount": [0, ""], "enable": "OK", "owner": True, "limit": "OK", "move": "OK",
        "kernel": True, "init": "Permission denied", "allocated": [1],
        "refused": [16, "/a"], "freeze": "OK", "kill": "OK", "killed": -9, "removed": True,
        "umount": [0, ""],
    }, done.stderr[-3000:]
