"""Delegation to a non-root user, as cgroup-v2.rst "Delegation" describes it and
kernel/cgroup/cgroup.c (cgroup_procs_write_permission) enforces it.

A subtree is delegated by chowning the cgroup's directory and its cgroup.procs, cgroup.threads
and cgroup.subtree_control to the user.  The user side runs in a separate process, an "agent"
started with setpriv as an unprivileged user (a session user made with useradd, or nobody), that
performs the file operations it is sent and reports their errno, and, for writes, whether the
open(2) (the kernel's permission check against the modes, default_permissions) or the write(2)
(the daemon's own checks) refused.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import DEADLINE, User, keyed, pids, read, wait_until, write

from encidfs.client import Client, ControlError

# The user side: one JSON request a line on stdin, one JSON reply a line on stdout.  It needs
# only the standard library, and an interpreter the user can execute (the venv's lives in
# /root, which is 0700).
AGENT = r"""
import errno, json, os, socket, sys

NAMES = {errno.EAGAIN: "EAGAIN", errno.EOPNOTSUPP: "EOPNOTSUPP"}

def name(error):
    return NAMES.get(error.errno) or errno.errorcode.get(error.errno, str(error.errno))

def write(path, data):
    data = data.encode()
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as error:
        return {"result": name(error), "at": "open"}
    try:
        written = os.write(fd, data)
    except OSError as error:
        return {"result": name(error), "at": "write"}
    finally:
        os.close(fd)
    return {"result": "OK" if written == len(data) else f"short write {written}"}

def simple(function, *args):
    try:
        value = function(*args)
    except OSError as error:
        return {"result": name(error)}
    return {"result": "OK", "value": value}

def stat(path):
    st = os.stat(path)
    return [st.st_mode & 0o7777, st.st_uid, st.st_gid]

def read(path):
    with open(path) as f:
        return f.read()

def control(path, request):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)

def send_fd(path, channel):
    fd = os.open(path, os.O_WRONLY)
    try:
        socket.send_fds(socket.socket(fileno=channel), [b"fd"], [fd])
    finally:
        os.close(fd)

OPS = {
    "whoami": lambda r: simple(lambda: [os.getpid(), os.getuid(), os.getgid(),
                                        sorted(os.getgroups())]),
    "write": lambda r: write(r["path"], r["data"]),
    "read": lambda r: simple(read, r["path"]),
    "stat": lambda r: simple(stat, r["path"]),
    "mkdir": lambda r: simple(os.mkdir, r["path"], r["mode"]),
    "rmdir": lambda r: simple(os.rmdir, r["path"]),
    "chmod": lambda r: simple(os.chmod, r["path"], r["mode"]),
    "chown": lambda r: simple(os.chown, r["path"], r["uid"], r["gid"]),
    "control": lambda r: simple(control, r["socket"], r["request"]),
    "send_fd": lambda r: simple(send_fd, r["path"], r["channel"]),
    "signal": lambda r: simple(os.kill, r["pid"], 0),
}

os.umask(0o022)
while line := sys.stdin.readline():
    request = json.loads(line)
    print(json.dumps(OPS[request["op"]](request)), flush=True)
"""


# -- the test user ------------------------------------------------------------------------------

@pytest.fixture
def umnt(mount_encidfs, traversable) -> Path:
    """A fresh instance mounted with allow_other, reachable by the test user: its mountpoint is
    in pytest's 0700 temporary directories, which `traversable` opens to o+x for the test."""
    return traversable(mount_encidfs("-o", "allow_other", "--control-mode", "0666"))


# -- the user's side ----------------------------------------------------------------------------

def _interpreter() -> str:
    """A Python the test user can execute: the system's (the venv's interpreter may live under
    /root, 0700); ours only if there is none."""
    for candidate in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


class Agent:
    """A process of the test user that performs file operations and control requests."""

    def __init__(self, user: User, groups: tuple[int, ...] = (), pass_fds=()) -> None:
        self.process = subprocess.Popen(
            [*user.setpriv(groups), _interpreter(), "-I", "-S", "-c", AGENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/", pass_fds=pass_fds)
        self.pid = self.process.pid  # setpriv execs the interpreter
        self.expected = [self.pid, user.uid, user.gid, sorted(groups)]

    def check(self) -> Agent:
        """Wait for the agent to answer, and check who it is."""
        assert self._call(op="whoami")["value"] == self.expected
        return self

    def _call(self, **request) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE)
        assert ready, f"the user agent did not answer {request['op']} within {DEADLINE} s"
        line = self.process.stdout.readline()
        assert line, f"the user agent died (exit status {self.process.poll()})"
        return json.loads(line)

    def write(self, path: Path, data: str | int) -> str:
        """"OK", or the errno name and which call refused: "EACCES at open" (the kernel's
        check of the file's mode) or "EACCES at write" (the daemon's check)."""
        reply = self._call(op="write", path=str(path), data=str(data))
        return reply["result"] + (f" at {reply['at']}" if "at" in reply else "")

    def read(self, path: Path) -> str:
        reply = self._call(op="read", path=str(path))
        assert reply["result"] == "OK", f"reading {path} as the user: {reply['result']}"
        return reply["value"]

    def stat(self, path: Path) -> tuple[int, int, int]:
        reply = self._call(op="stat", path=str(path))
        assert reply["result"] == "OK", f"stat {path} as the user: {reply['result']}"
        return tuple(reply["value"])

    def outcome(self, op: str, path: Path, **args) -> str:
        return self._call(op=op, path=str(path), **args)["result"]

    def mkdir(self, path: Path, mode: int = 0o755) -> str:
        return self.outcome("mkdir", path, mode=mode)

    def rmdir(self, path: Path) -> str:
        return self.outcome("rmdir", path)

    def chmod(self, path: Path, mode: int) -> str:
        return self.outcome("chmod", path, mode=mode)

    def chown(self, path: Path, uid: int, gid: int) -> str:
        return self.outcome("chown", path, uid=uid, gid=gid)

    def control(self, mnt: Path, **request) -> dict:
        """One request on the mount's control socket; the daemon's reply."""
        reply = self._call(op="control", socket=control_path(mnt), request=request)
        assert reply["result"] == "OK", f"control socket as the user: {reply['result']}"
        return reply["value"]

    def may_signal(self, pid: int) -> str:
        """What kill(2) of signal 0 says: "OK", "EPERM"."""
        return self._call(op="signal", pid=pid)["result"]

    def send_fd(self, path: Path, channel: int) -> None:
        """Open path for writing and pass the descriptor over the socket `channel`."""
        assert self._call(op="send_fd", path=str(path), channel=channel)["result"] == "OK"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=DEADLINE)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe:
                pipe.close()


@pytest.fixture
def agents(user: User) -> Iterator:
    """agents(groups=(), pass_fds=(), as_user=user): a user agent; all are killed and reaped in
    teardown."""
    started: list[Agent] = []

    def start(groups: tuple[int, ...] = (), pass_fds=(), as_user: User = user) -> Agent:
        agent = Agent(as_user, groups, pass_fds)
        started.append(agent)  # before anything can fail, so that it is reaped
        return agent.check()

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()


@pytest.fixture
def agent(agents) -> Agent:
    """The test user, with no supplementary groups."""
    return agents()


def user_sleep(procs, user: User) -> int:
    """A `sleep 600` of the test user (killed and reaped by `procs`); returns once the process
    runs as the user, so that the daemon sees its owner."""
    process = procs.start([*user.setpriv(), "sleep", "600"])

    def ready() -> bool:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
            with open(f"/proc/{process.pid}/comm") as f:
                comm = f.read().strip()
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            return False
        return comm == "sleep" and all(int(uid) == user.uid for uid in uids)

    wait_until(ready, f"process {process.pid} to run sleep as uid {user.uid}")
    return process.pid


# -- root's side --------------------------------------------------------------------------------

def delegate(cg: Path, uid: int, gid: int) -> Path:
    """Delegate cg as cgroup-v2.rst says: chown the directory and these three files."""
    for path in (cg, cg / "cgroup.procs", cg / "cgroup.threads", cg / "cgroup.subtree_control"):
        os.chown(path, uid, gid)
    return cg


def owner(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def control_path(mnt: Path) -> str:
    return os.getxattr(mnt, "user.encidfs.control").decode()


def current(cg: Path) -> int:
    return int(read(cg / "encids.sev.current"))


# -- reaching the mount ---------------------------------------------------------------------------

def test_roots_mount_answers_every_user_as_cgroupfs_does(mnt, traversable, user, agent, procs):
    """Mounted by root without -o allow_other: FUSE's default would refuse every other user
    before the modes are looked at; cgroupfs checks only the modes, so root's mount does too."""
    traversable(mnt)
    assert agent.read(mnt / "encids.sev.stat") == "total 509\nused 0\n"
    (mnt / "a").mkdir()
    delegated = delegate(mnt / "a", user.uid, user.gid)
    assert agent.mkdir(delegated / "x") == "OK"
    mine = user_sleep(procs, user)
    # Her cgroup.procs opens; the move out of the root needs the root's (the common ancestor).
    assert agent.write(delegated / "cgroup.procs", mine) == "EACCES at write"
    write(delegated / "cgroup.procs", str(mine))
    assert agent.write(delegated / "x" / "cgroup.procs", mine) == "OK"
    assert pids(delegated / "x") == [mine]


def test_with_allow_other_the_user_reads_but_cannot_write_roots_files(umnt, agent):
    assert agent.stat(umnt) == (0o555, 0, 0)
    assert agent.read(umnt / "encids.sev.stat") == "total 509\nused 0\n"
    assert agent.write(umnt / "cgroup.subtree_control", "+encids") == "EACCES at open"
    assert agent.write(umnt / "cgroup.procs", agent.pid) == "EACCES at open"
    assert agent.mkdir(umnt / "mine") == "EACCES"
    assert read(umnt / "cgroup.subtree_control") == ""


# -- the tree -----------------------------------------------------------------------------------

def test_user_makes_and_removes_cgroups_only_below_the_delegated_one(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    (umnt / "b").mkdir()
    (umnt / "a" / "roots").mkdir()

    assert agent.mkdir(delegated / "x", 0o750) == "OK"
    assert agent.mkdir(delegated / "x" / "deeper") == "OK"  # in its own cgroup, of course
    assert agent.mkdir(delegated / "x") == "EEXIST"
    assert agent.mkdir(umnt / "c") == "EACCES"
    assert agent.mkdir(umnt / "b" / "y") == "EACCES"
    assert agent.mkdir(umnt / "a") == "EEXIST"  # the name is looked up before the permission
    assert not (umnt / "c").exists() and not (umnt / "b" / "y").exists()

    assert agent.rmdir(umnt / "b") == "EACCES"
    assert agent.rmdir(delegated) == "EACCES"  # it is root's child: the root is root's
    assert agent.rmdir(umnt / "nothing") == "ENOENT"
    assert agent.rmdir(delegated / "nothing") == "ENOENT"
    assert agent.rmdir(delegated / "x") == "EBUSY"  # the rules still hold: it has a child
    assert agent.rmdir(delegated / "x" / "deeper") == "OK"
    assert agent.rmdir(delegated / "x") == "OK"
    # A cgroup root made inside the delegated one is still removable by the delegatee, who
    # owns the directory it is in (as on cgroupfs; the directory has no sticky bit).
    assert agent.rmdir(delegated / "roots") == "OK"
    assert sorted(p.name for p in umnt.iterdir() if p.is_dir()) == ["a", "b"]
    assert [p.name for p in delegated.iterdir() if p.is_dir()] == []


def test_new_cgroups_and_their_files_belong_to_their_creator(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert agent.mkdir(delegated / "x", 0o750) == "OK"

    new = delegated / "x"
    assert agent.stat(new) == (0o750, user.uid, user.gid)
    for name in ("cgroup.procs", "cgroup.subtree_control", "cgroup.max.depth", "cgroup.freeze",
                 "encids.sev.max", "encids.sev_es.max"):
        assert agent.stat(new / name) == (0o644, user.uid, user.gid), name
    assert agent.stat(new / "cgroup.kill") == (0o200, user.uid, user.gid)
    assert agent.stat(new / "encids.sev.current") == (0o444, user.uid, user.gid)
    # The delegated cgroup's own files that were not chowned stay root's.
    for name in ("encids.sev.max", "cgroup.max.depth", "cgroup.max.descendants",
                 "cgroup.freeze", "cgroup.type"):
        assert owner(delegated / name) == (0, 0), name
    assert owner(delegated / "cgroup.procs") == (user.uid, user.gid)


# -- limits -------------------------------------------------------------------------------------

def test_user_limits_cgroups_it_made_but_not_the_delegated_one(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    write(umnt / "a" / "encids.sev.max", "5")
    delegated = delegate(umnt / "a", user.uid, user.gid)

    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert read(delegated / "cgroup.subtree_control") == "encids\n"
    assert agent.mkdir(delegated / "x") == "OK"
    assert agent.write(delegated / "x" / "encids.sev.max", "3") == "OK"
    assert agent.write(delegated / "x" / "encids.sev_es.max", "max") == "OK"
    assert agent.write(delegated / "x" / "encids.sev.max", "x") == "EINVAL at write"
    assert read(delegated / "x" / "encids.sev.max") == "3\n"

    # The limit above the subtree is root's: the delegatee cannot raise it, nor the others.
    assert agent.write(delegated / "encids.sev.max", "100") == "EACCES at open"
    assert agent.write(delegated / "encids.sev_es.max", "1") == "EACCES at open"
    assert agent.write(delegated / "cgroup.max.descendants", "1") == "EACCES at open"
    assert agent.write(delegated / "cgroup.max.depth", "1") == "EACCES at open"
    assert agent.write(delegated / "cgroup.freeze", "1") == "EACCES at open"
    assert agent.write(delegated / "cgroup.kill", "1") == "EACCES at open"
    assert agent.write(umnt / "cgroup.subtree_control", "-encids") == "EACCES at open"
    assert read(delegated / "encids.sev.max") == "5\n"
    assert read(delegated / "encids.sev_es.max") == "max\n"
    assert read(delegated / "cgroup.max.descendants") == "max\n"
    assert read(umnt / "cgroup.subtree_control") == "encids\n"

    # In its own cgroups, the core limits are the user's too.
    assert agent.write(delegated / "x" / "cgroup.max.descendants", "0") == "OK"
    assert agent.mkdir(delegated / "x" / "y") == "EAGAIN"
    # It can turn the controller off again for its children, which then lose their files.
    assert agent.write(delegated / "cgroup.subtree_control", "-encids") == "OK"
    assert not (delegated / "x" / "encids.sev.max").exists()


# -- migration ----------------------------------------------------------------------------------

def test_user_moves_processes_within_the_delegated_subtree(umnt, user, agent, procs):
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    for name in ("x", "y"):
        assert agent.mkdir(delegated / name) == "OK"
    x, y = delegated / "x", delegated / "y"
    mine = user_sleep(procs, user)
    write(x / "cgroup.procs", str(mine))  # root puts it in: the user could not (see below)

    assert agent.write(y / "cgroup.procs", mine) == "OK"
    assert pids(y) == [mine] and pids(x) == []
    assert agent.write(delegated / "cgroup.procs", mine) == "OK"  # up to the delegated one
    assert pids(delegated) == [mine] and pids(y) == []
    assert agent.write(x / "cgroup.procs", mine) == "OK"  # and down again
    assert pids(x) == [mine]

    # The daemon's checks still come after the permission: no such process, not a number.
    assert agent.write(y / "cgroup.procs", 2**22 + 1) == "ESRCH at write"
    assert agent.write(y / "cgroup.procs", "me") == "EINVAL at write"

    # Processes inside the subtree move whoever owns them (cgroup v2 checks only the files).
    roots = procs.sleep().pid
    write(x / "cgroup.procs", str(roots))
    assert agent.write(y / "cgroup.procs", roots) == "OK"
    assert pids(y) == [roots]

    # "0" is the writer (here also the opener): root puts the agent in, it moves itself.
    write(x / "cgroup.procs", str(agent.pid))
    assert agent.write(y / "cgroup.procs", 0) == "OK"
    assert pids(y) == sorted([roots, agent.pid]) and pids(x) == [mine]

    # Threads: within its own cgroup (no threaded subtrees here), and nowhere else.
    assert agent.write(x / "cgroup.threads", mine) == "OK"
    assert agent.write(y / "cgroup.threads", mine) == "EOPNOTSUPP at write"


def test_the_core_rules_still_bind_the_delegatee(umnt, user, agent, procs):
    """Permission first (the open), then the daemon's rules, with their own errnos."""
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    assert agent.mkdir(delegated / "x") == "OK"
    x = delegated / "x"
    mine = user_sleep(procs, user)
    write(x / "cgroup.procs", str(mine))

    # The root does not enable encids: a does not offer it to its children.
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "ENOENT at write"
    write(umnt / "cgroup.subtree_control", "+encids")
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert agent.write(delegated / "cgroup.subtree_control", "+memory") == "EINVAL at write"
    # No internal processes: x has one, a enables a controller.
    assert agent.write(x / "cgroup.subtree_control", "+encids") == "EBUSY at write"
    assert agent.write(delegated / "cgroup.procs", mine) == "EBUSY at write"
    assert agent.rmdir(x) == "EBUSY"
    assert agent.write(delegated / "cgroup.subtree_control", "-encids") == "OK"
    assert agent.write(delegated / "cgroup.procs", mine) == "OK"
    assert agent.rmdir(x) == "OK"
    assert pids(delegated) == [mine]


def test_nothing_moves_into_or_out_of_the_delegated_subtree(umnt, user, agent, procs):
    (umnt / "a").mkdir()
    (umnt / "b").mkdir()
    (umnt / "c").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    other = delegate(umnt / "b", user.uid, user.gid)  # a second delegation to the same user
    assert agent.mkdir(delegated / "x") == "OK"
    x = delegated / "x"
    inside, outside = user_sleep(procs, user), user_sleep(procs, user)
    write(x / "cgroup.procs", str(inside))

    # In from the root: the common ancestor is the root, whose cgroup.procs is root's.  The
    # destination's file is the user's, so the open succeeds and the daemon refuses.
    assert agent.write(x / "cgroup.procs", outside) == "EACCES at write"
    assert agent.write(delegated / "cgroup.procs", outside) == "EACCES at write"
    # Out to the root, or to a sibling not delegated: the kernel refuses the open.
    assert agent.write(umnt / "cgroup.procs", inside) == "EACCES at open"
    assert agent.write(umnt / "c" / "cgroup.procs", inside) == "EACCES at open"
    # Out to another delegated subtree: both files are the user's, the root's is not.
    assert agent.write(other / "cgroup.procs", inside) == "EACCES at write"
    assert agent.write(x / "cgroup.threads", outside) == "EACCES at write"
    assert pids(x) == [inside] and pids(other) == [] and pids(delegated) == []
    assert outside in pids(umnt) and inside not in pids(umnt)

    # The common ancestor's mode is what counts, as the daemon sees it now: a delegatee who
    # makes the delegated cgroup.procs read-only can no longer move within its subtree.
    assert agent.mkdir(delegated / "y") == "OK"
    assert agent.chmod(delegated / "cgroup.procs", 0o444) == "OK"
    assert agent.write(delegated / "y" / "cgroup.procs", inside) == "EACCES at write"
    assert agent.chmod(delegated / "cgroup.procs", 0o644) == "OK"
    assert agent.write(delegated / "y" / "cgroup.procs", inside) == "OK"

    # Root moves anything anywhere.
    write(umnt / "c" / "cgroup.procs", str(inside))
    write(x / "cgroup.procs", str(outside))
    assert pids(umnt / "c") == [inside] and pids(x) == [outside]


def test_migration_checks_the_credentials_of_who_opened_the_file(umnt, user, agents, procs):
    """cgroup_procs_write_permission() judges the opener (of->file->f_cred), not the writer: a
    cgroup.procs descriptor a user opened and handed to root moves nothing the user could not."""
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    roots = procs.sleep().pid
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine, theirs:
        agent = agents(pass_fds=(theirs.fileno(),))
        agent.send_fd(delegated / "cgroup.procs", theirs.fileno())
        _, fds, _, _ = socket.recv_fds(mine, 16, 1)
    fd = fds[0]
    try:
        with pytest.raises(PermissionError) as refused:
            os.write(fd, str(roots).encode())  # as root, but through the user's open file
        assert refused.value.errno == errno.EACCES
    finally:
        os.close(fd)
    assert pids(delegated) == []
    write(delegated / "cgroup.procs", str(roots))  # root's own descriptor may
    assert pids(delegated) == [roots]


# -- attributes ---------------------------------------------------------------------------------

def test_user_changes_modes_and_owners_only_of_what_it_owns(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert agent.mkdir(delegated / "x") == "OK"
    limit = delegated / "x" / "encids.sev.max"

    assert agent.chmod(limit, 0o444) == "OK"
    assert agent.stat(limit)[0] == 0o444
    assert agent.write(limit, "1") == "EACCES at open"  # the owner's bits apply to the owner
    assert agent.chmod(limit, 0o664) == "OK"
    assert agent.write(limit, "1") == "OK"
    assert agent.chmod(delegated / "x", 0o700) == "OK"
    assert agent.chmod(delegated, 0o750) == "OK"  # the delegated directory is the user's
    assert agent.stat(delegated)[0] == 0o750
    assert agent.chown(limit, user.uid, user.gid) == "OK"  # to itself: nothing to check

    assert agent.chmod(delegated / "encids.sev.max", 0o666) == "EPERM"
    assert agent.chmod(umnt, 0o777) == "EPERM"
    assert agent.chmod(umnt / "cgroup.procs", 0o666) == "EPERM"
    assert agent.chown(limit, 0, 0) == "EPERM"  # giving away needs CAP_CHOWN
    assert agent.chown(limit, user.uid, 0) == "EPERM"  # a group it is not in
    assert agent.chown(delegated / "encids.sev.max", user.uid, user.gid) == "EPERM"
    assert os.stat(delegated / "encids.sev.max").st_mode & 0o777 == 0o644
    assert owner(limit) == (user.uid, user.gid)
    assert stat.S_IMODE(os.stat(umnt).st_mode) == 0o555


def test_root_still_does_everything_in_the_delegated_subtree(umnt, user, agent, procs):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert agent.mkdir(delegated / "x") == "OK"
    x = delegated / "x"
    assert agent.chmod(x / "encids.sev.max", 0o400) == "OK"
    assert agent.chmod(x / "cgroup.procs", 0o400) == "OK"

    write(x / "encids.sev.max", "7")  # whatever the mode: CAP_DAC_OVERRIDE
    assert read(x / "encids.sev.max") == "7\n"
    write(delegated / "cgroup.subtree_control", "-encids")
    write(delegated / "cgroup.subtree_control", "+encids")
    mine = user_sleep(procs, user)
    write(x / "cgroup.procs", str(mine))
    write(umnt / "cgroup.procs", str(mine))  # out of the subtree again
    assert mine in pids(umnt) and pids(x) == []
    os.chmod(x / "cgroup.procs", 0o644)
    os.chown(x / "cgroup.procs", 0, 0)
    assert owner(x / "cgroup.procs") == (0, 0)
    assert agent.write(x / "cgroup.procs", mine) == "EACCES at open"
    x.rmdir()
    assert not x.exists()


def test_group_members_may_write_group_writable_files(umnt, user, agents, procs):
    """The kernel checks the open against the group bits (default_permissions); the daemon
    checks the common ancestor's cgroup.procs the same way, with the opener's supplementary
    groups."""
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "g").mkdir()
    shared = umnt / "g"
    os.chown(shared / "encids.sev.max", 0, user.group)
    os.chmod(shared / "encids.sev.max", 0o664)
    member, outsider = agents(groups=(user.group,)), agents()

    assert outsider.write(shared / "encids.sev.max", "3") == "EACCES at open"
    assert member.write(shared / "encids.sev.max", "4") == "OK"
    assert read(shared / "encids.sev.max") == "4\n"

    # g's cgroup.procs is group-writable; its children's are the user's own.
    os.chown(shared / "cgroup.procs", 0, user.group)
    os.chmod(shared / "cgroup.procs", 0o664)
    for name in ("s1", "s2"):
        (shared / name).mkdir()
        os.chown(shared / name / "cgroup.procs", user.uid, user.gid)
    s1, s2 = shared / "s1", shared / "s2"
    mine = user_sleep(procs, user)
    write(s1 / "cgroup.procs", str(mine))
    assert outsider.write(s2 / "cgroup.procs", mine) == "EACCES at write"
    assert pids(s1) == [mine]
    assert member.write(s2 / "cgroup.procs", mine) == "OK"
    assert pids(s2) == [mine]
    # The owner's bits come first: an owner with no write bit is refused even in the group.
    os.chown(shared / "cgroup.procs", user.uid, user.group)
    os.chmod(shared / "cgroup.procs", 0o464)
    assert member.write(s1 / "cgroup.procs", mine) == "EACCES at write"
    os.chmod(shared / "cgroup.procs", 0o444)
    os.chown(shared / "cgroup.procs", 0, user.group)
    assert member.write(s1 / "cgroup.procs", mine) == "EACCES at write"  # no g+w any more
    os.chmod(shared / "cgroup.procs", 0o446)  # others: write; the group's bits still rule
    assert member.write(s1 / "cgroup.procs", mine) == "EACCES at write"
    assert outsider.write(s1 / "cgroup.procs", mine) == "OK"
    assert pids(s1) == [mine]


# -- the control socket -------------------------------------------------------------------------

def test_control_socket_acts_only_for_the_users_own_processes(umnt, user, agent, procs):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegate(umnt / "a", user.uid, user.gid)
    roots = procs.sleep().pid
    mine = user_sleep(procs, user)
    write(umnt / "a" / "cgroup.procs", str(roots))

    refused = agent.control(umnt, op="allocate", type="sev", count=1, pid=roots)
    assert (refused["ok"], refused["errno"]) == (False, "EPERM")
    init = agent.control(umnt, op="allocate", type="sev", pid=1)
    assert (init["ok"], init["errno"]) == (False, "EPERM")
    gone = agent.control(umnt, op="allocate", type="sev", pid=2**22 + 1)
    assert (gone["ok"], gone["errno"]) == (False, "ESRCH")
    in_root = agent.control(umnt, op="allocate", type="sev", pid=mine)
    assert (in_root["ok"], in_root["errno"]) == (False, "EPERM")  # the owner places it first
    assert current(umnt / "a") == 0

    write(umnt / "a" / "cgroup.procs", str(mine))
    write(umnt / "a" / "cgroup.procs", str(agent.pid))
    granted = agent.control(umnt, op="allocate", type="sev", count=2, pid=mine)
    assert granted["ok"] and granted["holder"] == mine and granted["cgroup"] == "/a"
    own = agent.control(umnt, op="allocate", type="sev_es")  # pid: the caller itself
    assert own["ok"] and own["holder"] == agent.pid
    assert keyed(read(umnt / "encids.sev.stat"))["used"] == 2

    with Client.connect(mount=str(umnt)) as client:
        root_ids = client.allocate("sev", pid=roots)
        not_yours = agent.control(umnt, op="free", ids=list(root_ids), pid=roots)
        assert (not_yours["ok"], not_yours["errno"]) == (False, "EPERM")
        mixed = agent.control(umnt, op="free", ids=[own["ids"][0], root_ids[0]])
        assert (mixed["ok"], mixed["errno"]) == (False, "EINVAL")  # all or nothing
        assert keyed(read(umnt / "encids.sev.stat"))["used"] == 3
        assert current(umnt / "a") == 3
        assert agent.control(umnt, op="free", ids=own["ids"])["ok"]
        client.free(list(root_ids), pid=roots)  # the owner frees anyone's
        client.free(granted["ids"], pid=mine)
        assert client.allocate("sev", pid=mine) and client.allocate("sev", pid=agent.pid)
    assert keyed(read(umnt / "encids.sev.stat"))["used"] == 2


def test_who_may_signal_the_holder_allocates_for_it_and_frees_what_it_holds(
        umnt, second_user, agents):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    holder, same_user, other_user = agents(), agents(), agents(as_user=second_user)
    write(umnt / "a" / "cgroup.procs", str(holder.pid))

    for name, peer in ("the holder itself", holder), ("another process of its user", same_user):
        assert peer.may_signal(holder.pid) == "OK", name
        allocated = peer.control(umnt, op="allocate", type="sev", count=2, pid=holder.pid)
        assert allocated["ok"] and allocated["holder"] == holder.pid, (name, allocated)
        freed = peer.control(umnt, op="free", ids=allocated["ids"], pid=holder.pid)
        assert freed == {"ok": True, "ids": allocated["ids"], "holder": holder.pid}, name
        assert current(umnt / "a") == 0
    own = holder.control(umnt, op="allocate", type="sev")  # pid: the caller itself
    assert holder.control(umnt, op="free", ids=own["ids"])["ok"]

    assert other_user.may_signal(holder.pid) == "EPERM"
    refused = other_user.control(umnt, op="allocate", type="sev", pid=holder.pid)
    assert (refused["ok"], refused["errno"]) == (False, "EPERM")
    with Client.connect(mount=str(umnt)) as client:  # root, the mount's owner
        held = client.allocate("sev", count=3, pid=holder.pid)
        refused = other_user.control(umnt, op="free", ids=list(held), pid=holder.pid)
        assert (refused["ok"], refused["errno"]) == (False, "EPERM")
        assert current(umnt / "a") == 3
        client.free(list(held[:1]), pid=holder.pid)
        assert current(umnt / "a") == 2

        # The holder exits and its IDs go with it: a late free names IDs it holds no more.
        holder.stop()
        wait_until(lambda: current(umnt / "a") == 0, "the exited holder's IDs to be freed")
        late = same_user.control(umnt, op="free", ids=list(held[1:]), pid=holder.pid)
        assert (late["ok"], late["errno"]) == (False, "EINVAL")
        with pytest.raises(ControlError) as late_for_the_owner:
            client.free(list(held[1:]), pid=holder.pid)
        assert late_for_the_owner.value.errno == errno.EINVAL


HOLDER = """
import os, sys, time
os.setgroups([])
os.setresgid(*map(int, sys.argv[1:4]))
os.setresuid(*map(int, sys.argv[4:7]))
print(flush=True)
time.sleep(600)  # no exec(2): it would make the saved UID the effective one
"""


@pytest.mark.parametrize("holders_uids, may", [
    ("user, other, other", True),
    ("other, other, user", True),
    ("other, user, other", False),
], ids=["real UID", "saved UID", "effective UID only"])
def test_a_holders_real_or_saved_uid_lets_its_user_act_for_it_as_kill_does(
        umnt, user, second_user, agents, procs, holders_uids, may):
    """A holder's (real, effective, saved) UIDs, of the user or another: the user may
    allocate for it and free what it holds where kill(2) lets her signal it, and only there."""
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    uids = [{"user": user.uid, "other": second_user.uid}[who] for who in holders_uids.split(", ")]
    holder = procs.start([sys.executable, "-c", HOLDER, *map(str, [second_user.gid] * 3 + uids)],
                         stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "\n"
    write(umnt / "a" / "cgroup.procs", str(holder.pid))
    agent = agents()

    assert agent.may_signal(holder.pid) == ("OK" if may else "EPERM")
    allocated = agent.control(umnt, op="allocate", type="sev", pid=holder.pid)
    if may:
        assert allocated["ok"], allocated
        held = allocated["ids"]
    else:
        assert (allocated["ok"], allocated["errno"]) == (False, "EPERM")
        with Client.connect(mount=str(umnt)) as client:
            held = list(client.allocate("sev", pid=holder.pid))
    freed = agent.control(umnt, op="free", ids=held, pid=holder.pid)
    assert freed["ok"] == may and current(umnt / "a") == (0 if may else 1), freed


def test_users_allocations_are_charged_in_its_subtree_within_the_limits_above(
        umnt, user, agent, procs):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = umnt / "a"
    write(delegated / "encids.sev.max", "3")
    delegate(delegated, user.uid, user.gid)
    for name in ("x", "y"):
        assert agent.mkdir(delegated / name) == "OK"
    x, y = delegated / "x", delegated / "y"
    holder, other = user_sleep(procs, user), user_sleep(procs, user)
    write(x / "cgroup.procs", str(holder))
    assert agent.write(y / "cgroup.procs", holder) == "OK"
    assert agent.write(x / "cgroup.procs", holder) == "OK"
    write(y / "cgroup.procs", str(other))
    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert agent.write(x / "encids.sev.max", "2") == "OK"

    first = agent.control(umnt, op="allocate", type="sev", pid=holder)
    assert first["ok"] and first["cgroup"] == "/a/x"
    assert (current(x), current(delegated)) == (1, 1)

    over_own = agent.control(umnt, op="allocate", type="sev", count=2, pid=holder)
    assert (over_own["ok"], over_own["errno"], over_own["cgroup"]) == (False, "EBUSY", "/a/x")
    assert agent.write(x / "encids.sev.max", "max") == "OK"  # its own limit: it may lift it
    over_roots = agent.control(umnt, op="allocate", type="sev", count=3, pid=holder)
    assert (over_roots["ok"], over_roots["errno"], over_roots["cgroup"]) == (False, "EBUSY", "/a")
    assert agent.write(delegated / "encids.sev.max", "max") == "EACCES at open"  # not root's
    # Refusals count where they happened and above: /a/x once, /a twice.
    assert keyed(read(x / "encids.sev.events")) == {"max": 1}
    assert keyed(read(delegated / "encids.sev.events")) == {"max": 2}

    second = agent.control(umnt, op="allocate", type="sev", count=1, pid=other)
    assert second["ok"] and second["cgroup"] == "/a/y"
    third = agent.control(umnt, op="allocate", type="sev", count=1, pid=holder)
    assert third["ok"] and third["cgroup"] == "/a/x"
    assert (current(x), current(y), current(delegated)) == (2, 1, 3)
    full = agent.control(umnt, op="allocate", type="sev", pid=other)
    assert (full["errno"], full["cgroup"]) == ("EBUSY", "/a")

    # Moving the holder does not move its charge; its exit frees it.
    assert agent.write(y / "cgroup.procs", holder) == "OK"
    assert (current(x), current(y)) == (2, 1)
    os.kill(holder, 9)
    wait_until(lambda: current(delegated) == 1, "the holder's IDs to be freed")
    assert (current(x), current(y)) == (0, 1)


# -- files made when a controller is enabled ------------------------------------------------------
#
# On cgroupfs a file belongs to whoever's action created it: cgroup_add_file() gives it
# current_fsuid()/current_fsgid() (cgroup_kn_set_ugid(), or __kernfs_create_file()'s arguments
# in newer kernels).  A controller's files are created by the write to the parent's
# cgroup.subtree_control that enables the controller, not by the cgroup's mkdir, so they belong
# to the writer, who need not be the cgroup's creator.

def test_limits_that_root_enables_in_the_users_cgroup_are_roots(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    assert agent.mkdir(delegated / "users") == "OK"

    write(delegated / "cgroup.subtree_control", "+encids")  # root enables it, not the user
    assert owner(delegated / "users" / "cgroup.procs") == (user.uid, user.gid)  # from mkdir
    assert owner(delegated / "users" / "encids.sev.max") == (0, 0)  # from root's write
    assert agent.write(delegated / "users" / "encids.sev.max", "1") == "EACCES at open"


def test_limits_that_the_user_enables_in_roots_cgroup_are_the_users(umnt, user, agent):
    write(umnt / "cgroup.subtree_control", "+encids")
    (umnt / "a").mkdir()
    delegated = delegate(umnt / "a", user.uid, user.gid)
    (delegated / "roots").mkdir()  # root makes a cgroup inside the delegated subtree

    assert agent.write(delegated / "cgroup.subtree_control", "+encids") == "OK"
    assert owner(delegated / "roots" / "cgroup.procs") == (0, 0)  # from root's mkdir
    assert owner(delegated / "roots" / "encids.sev.max") == (user.uid, user.gid)  # user's write
    assert agent.write(delegated / "roots" / "encids.sev.max", "1") == "OK"
