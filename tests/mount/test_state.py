"""Durable state: what was acknowledged survives `kill -9` of the daemon and a restart."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mountutil import FSTYPE, mounted_fstype, nested, pids, read, wait_until, write

from encidfs.client import Client

ENCIDFS = [sys.executable, "-m", "encidfs"]


def encidfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL)


def daemon_pid(mnt: Path) -> int:
    return int(os.getxattr(mnt, "user.encidfs.pid"))


@pytest.fixture
def stateful(tmp_path):
    """A mountpoint and a state file; every daemon mounted there is stopped afterwards."""
    mnt, state = tmp_path / "mnt", tmp_path / "state.db"
    mnt.mkdir()
    daemons: list[int] = []

    def mount(*args: str) -> subprocess.CompletedProcess[str]:
        result = encidfs("mount", str(mnt), "--state", str(state), *args, check=False)
        if result.returncode == 0:
            daemons.append(daemon_pid(mnt))
        return result

    yield mnt, state, mount
    if mounted_fstype(mnt) == FSTYPE:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    for pid in daemons:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_daemon(mnt: Path) -> None:
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z", "the daemon to die")


def snapshot(mnt: Path) -> dict[str, object]:
    """Every file of every cgroup, every node's mode, owner and xattrs; the root's process
    lists are left out (they list every process on the machine)."""
    state: dict[str, object] = {}
    for directory, dirs, files in os.walk(mnt):
        for name in [".", *files]:
            path = Path(directory, name)
            rel = str(path.relative_to(mnt))
            info = os.stat(path)
            state[f"{rel} attrs"] = (oct(info.st_mode), info.st_uid, info.st_gid)
            state[f"{rel} xattrs"] = {x: os.getxattr(path, x) for x in os.listxattr(path)
                                      if not x.startswith("user.encidfs.")}
            if name == "." or rel in ("cgroup.procs", "cgroup.threads") or name == "cgroup.kill":
                continue
            state[rel] = read(path)
    return state


@pytest.fixture
def sleeps():
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen(["sleep", "600"]))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_kill_9_and_mount_again_restores_everything_acknowledged(stateful, sleeps):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    a, b = nested(mnt)
    write(a / "encids.sev.max", "7")
    write(b / "encids.sev_es.max", "0x10")
    write(a / "cgroup.max.depth", "3")
    write(mnt / "cgroup.max.descendants", "50")
    (mnt / "frozen").mkdir(mode=0o750)
    write(mnt / "frozen/cgroup.freeze", "1")
    (mnt / "delegated").mkdir()
    os.chown(mnt / "delegated", 65534, 65534)
    os.chown(mnt / "delegated/cgroup.procs", 65534, 65534)
    os.chmod(mnt / "delegated/cgroup.subtree_control", 0o664)
    os.setxattr(mnt / "delegated", "user.note", b"tenant 7")
    member, holder, leaver = sleeps(), sleeps(), sleeps()
    write(b / "cgroup.procs", str(member.pid))
    (mnt / "gone").mkdir()
    with Client.connect(mount=str(mnt)) as client:
        held = client.allocate("sev", 2, pid=member.pid)
        write(mnt / "gone/cgroup.procs", str(holder.pid))
        in_removed = client.allocate("sev_es", 1, pid=holder.pid)
        write(mnt / "cgroup.procs", str(holder.pid))
        os.rmdir(mnt / "gone")  # dying while holder keeps its ID
        write(b / "cgroup.procs", str(leaver.pid))
        client.allocate("sev", 1, pid=leaver.pid)
    before = snapshot(mnt)
    assert "nr_dying_descendants 1" in before["cgroup.stat"]

    kill_daemon(mnt)
    with pytest.raises(OSError) as dead:
        os.statvfs(mnt)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert mount().returncode == 0  # the dead mount is cleaned up first
    assert snapshot(mnt) == before
    assert pids(b) == sorted([member.pid, leaver.pid])

    # Processes that went while the daemon was down are dropped, with their IDs.
    kill_daemon(mnt)
    leaver.kill()
    leaver.wait()
    assert mount().returncode == 0
    assert pids(b) == [member.pid]
    assert read(a / "encids.sev.current") == "2\n"  # the member's, charged below a
    assert "used 2" in read(mnt / "encids.sev.stat")
    assert "nr_dying_descendants 1" in read(mnt / "cgroup.stat")
    with Client.connect(mount=str(mnt)) as client:
        assert client.allocate("sev", 1, pid=member.pid) == [3]  # the leaver's ID, free again
        status = client.status()
    holders = {(h["pid"], h["type"]): h for h in status["holders"]}
    assert holders[(member.pid, "sev")]["ids"] == sorted([*held, 3])
    assert holders[(holder.pid, "sev_es")]["ids"] == list(in_removed)
    holder.kill()
    holder.wait()
    wait_until(lambda: "nr_dying_descendants 0" in read(mnt / "cgroup.stat"),
               "the removed cgroup to be released with its last charge")


def test_writes_acknowledged_before_a_crash_under_load_survive(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    acknowledged: list[int] = []
    stop = threading.Event()

    def load() -> None:
        value = 0
        while not stop.is_set():
            value += 1
            try:
                write(mnt / "a/encids.sev.max", str(value))
            except OSError:
                return  # the daemon is gone
            acknowledged.append(value)

    writer = threading.Thread(target=load)
    writer.start()
    wait_until(lambda: len(acknowledged) >= 200, "some acknowledged writes")
    kill_daemon(mnt)
    stop.set()
    writer.join()
    assert mount().returncode == 0
    last = acknowledged[-1]
    # The write in flight when the daemon died may or may not have been committed.
    assert int(read(mnt / "a/encids.sev.max")) in (last, last + 1)


def test_umount_and_mount_again_restores(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "x").mkdir()
    write(mnt / "x/encids.sev.max", "max")
    write(mnt / "x/encids.sev_es.max", "4")
    before = snapshot(mnt)
    assert encidfs("umount", str(mnt)).returncode == 0
    assert sqlite3.connect(state).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert mount().returncode == 0
    assert snapshot(mnt) == before


def test_sigterm_unmounts_and_leaves_the_state_consistent(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    (mnt / "kept").mkdir()
    os.kill(daemon_pid(mnt), signal.SIGTERM)
    wait_until(lambda: mounted_fstype(mnt) is None, "the daemon to unmount")
    db = sqlite3.connect(state)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT path FROM cgroups ORDER BY path").fetchall() == [("/",), ("/kept",)]


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"\0" * 4096])
def test_a_corrupt_state_file_is_refused_and_left_alone(stateful, content):
    mnt, state, mount = stateful
    state.write_bytes(content)
    result = mount()
    assert result.returncode == 1
    assert result.stderr.startswith("encidfs: ") and "Traceback" not in result.stderr
    assert "state file" in result.stderr
    assert state.read_bytes() == content
    assert mounted_fstype(mnt) is None


def test_a_state_file_of_another_format_or_layout_is_refused_and_left_alone(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    assert encidfs("umount", str(mnt)).returncode == 0
    original = state.read_bytes()
    result = mount("--capacity", "sev=3")
    assert result.returncode == 1 and "other resource types" in result.stderr
    db = sqlite3.connect(state)
    with db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.close()
    changed = state.read_bytes()
    result = mount()
    assert result.returncode == 1 and "format 99" in result.stderr
    assert state.read_bytes() == changed != original
