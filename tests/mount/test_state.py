"""Durable state: what was acknowledged survives `kill -9` of the daemon and a restart."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mountutil import FSTYPE, keyed, mounted_fstype, nested, outcome, pids, read, wait_until, write

from encidfs.client import Client
from encidfs.procs.procfs import alive, read_stat

ENCIDFS = [sys.executable, "-m", "encidfs"]


def encidfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*ENCIDFS, *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert not check or result.returncode == 0, result.stderr
    return result


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
            daemons.append(supervisor_pid(result))
            daemons.append(daemon_pid(mnt))
        return result

    yield mnt, state, mount
    stop_all(mnt, daemons)


def supervisor_pid(result: subprocess.CompletedProcess[str]) -> int:
    return int(result.stdout.rsplit("supervisor pid ", 1)[1].rstrip(")\n"))


def stop_all(mnt: Path, pids: list[int]) -> None:
    """Supervisors first (they would mount again), then daemons, then the mount."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if mounted_fstype(mnt) == FSTYPE:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def kill_daemon(mnt: Path) -> None:
    """kill -9 the daemon and its supervisor (which would mount again at once, see
    test_resilience): what is left is the dead mount and the state file."""
    pid = daemon_pid(mnt)
    supervisor = read_stat(pid).ppid
    for process in (supervisor, pid):
        os.kill(process, signal.SIGKILL)
        wait_until(lambda: not alive(process), f"process {process} to die")


def snapshot(mnt: Path) -> dict[str, object]:
    """Every file of every cgroup, every node's mode, owner and xattrs; the root's process
    lists are left out (they list every process on the machine)."""
    state: dict[str, object] = {}
    for directory, _, files in os.walk(mnt):
        for name in [".", *files]:
            path = Path(directory, name)
            rel = str(path.relative_to(mnt))
            info = os.stat(path)
            state[f"{rel} attrs"] = (oct(info.st_mode), info.st_uid, info.st_gid)
            state[f"{rel} xattrs"] = {x: os.getxattr(path, x) for x in os.listxattr(path)
                                      if not x.startswith("user.encidfs.")}
            # cgroup.stat.local counts the time spent freezing: it is compared on its own.
            if name == "." or rel in ("cgroup.procs", "cgroup.threads") \
                    or name in ("cgroup.kill", "cgroup.stat.local"):
                continue
            try:
                state[rel] = read(path)
            except OSError as error:  # cgroup.procs of a threaded cgroup
                state[rel] = errno.errorcode[error.errno]
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


@pytest.mark.slow
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
    frozen_usec = keyed(read(mnt / "frozen/cgroup.stat.local"))["frozen_usec"]

    kill_daemon(mnt)
    with pytest.raises(OSError) as dead:
        os.statvfs(mnt)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert mount().returncode == 0  # the dead mount is cleaned up first
    assert snapshot(mnt) == before
    # The freezing went on all along, and counted while the daemon was down.
    assert keyed(read(mnt / "frozen/cgroup.stat.local"))["frozen_usec"] > frozen_usec
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


def test_kill_9_and_mount_again_restores_a_threaded_subtree_and_its_threads(stateful, procs):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    p = mnt / "p"
    for cg in (p, p / "a", p / "b"):
        cg.mkdir()
    write(p / "a" / "cgroup.type", "threaded")
    pool = procs.pool()
    worker, leaving = pool.spawn(), pool.spawn()
    write(p / "cgroup.procs", str(pool.pid))
    write(p / "a" / "cgroup.threads", str(worker))
    write(p / "a" / "cgroup.threads", str(leaving))
    before = snapshot(mnt)
    assert before["p/cgroup.type"] == "domain threaded\n"

    kill_daemon(mnt)
    pool.exit(leaving)  # gone while the daemon was down
    assert mount().returncode == 0
    after = snapshot(mnt)
    assert after.pop("p/a/cgroup.threads") == "".join(f"{t}\n" for t in sorted([worker]))
    assert before.pop("p/a/cgroup.threads") == "".join(f"{t}\n" for t in
                                                       sorted([worker, leaving]))
    assert after == before
    assert [tids(cg) for cg in (p, p / "a")] == [[pool.pid], [worker]]
    made = pool.spawn()  # followed after the restart, in the leader's cgroup
    assert tids(p) == sorted([pool.pid, made])


def tids(cg: Path) -> list[int]:
    return sorted(int(tid) for tid in read(cg / "cgroup.threads").split())


@pytest.mark.slow
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
    assert integrity(state) == "ok"
    assert mount().returncode == 0
    assert snapshot(mnt) == before


def test_sigterm_unmounts_and_leaves_the_state_consistent(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    (mnt / "kept").mkdir()
    os.kill(daemon_pid(mnt), signal.SIGTERM)
    wait_until(lambda: mounted_fstype(mnt) is None, "the daemon to unmount")
    wait_until(lambda: not os.path.exists(f"{state}.lock") or lock_free(state),
               "the daemon to let go of the state file")
    assert integrity(state) == "ok"
    with contextlib.closing(sqlite3.connect(state)) as db:
        # Compacted at the stop: the whole state in the snapshot, no records after it.
        data = json.loads(db.execute("SELECT data FROM snapshot").fetchone()[0])
        generation = dict(db.execute("SELECT key, value FROM meta"))["generation"]
    assert Path(f"{state}.log").read_text() == f'["encidfs-log", {generation}]\n'
    assert sorted(cg["name"] for cg in data["engine"]["cgroups"]) == ["", "kept"]


def integrity(state: Path) -> str:
    with contextlib.closing(sqlite3.connect(state)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def lock_free(state: Path) -> bool:
    with open(f"{state}.lock", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


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


@pytest.mark.slow
def test_a_state_file_of_another_format_or_layout_is_refused_and_left_alone(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    assert encidfs("umount", str(mnt)).returncode == 0
    original = state.read_bytes()
    result = mount("--capacity", "sev=3")
    assert result.returncode == 1 and "other resource types" in result.stderr
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    changed = state.read_bytes()
    result = mount()
    assert result.returncode == 1 and "format 99" in result.stderr
    assert state.read_bytes() == changed != original


# -- the journal records exactly what the files show ------------------------------------------

@pytest.mark.parametrize("then", ["umount", "re-enable and kill -9"])
def test_a_limit_goes_with_its_controller(stateful, then):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    write(mnt / "a/encids.sev.max", "5")
    write(mnt / "cgroup.subtree_control", "-encids")
    if then == "umount":
        assert encidfs("umount", str(mnt)).returncode == 0
        assert mount().returncode == 0
        write(mnt / "cgroup.subtree_control", "+encids")
    else:
        write(mnt / "cgroup.subtree_control", "+encids")
        assert read(mnt / "a/encids.sev.max") == "max\n"
        kill_daemon(mnt)
        assert mount().returncode == 0
    assert read(mnt / "a/encids.sev.max") == "max\n"


def test_the_files_a_mount_lacks_take_their_attributes_with_them(stateful):
    """A state file of a mount with other controllers: the nodes it has keep theirs."""
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+encids +misc")  # a's controller files: new nodes
    (mnt / "a").mkdir()
    os.chmod(mnt / "a/misc.max", 0o600)
    os.chmod(mnt / "a/encids.sev.max", 0o600)
    os.setxattr(mnt / "a/misc.current", "user.note", b"x")
    assert encidfs("umount", str(mnt)).returncode == 0
    result = mount("--controllers", "encids")
    assert result.returncode == 0, result.stderr
    assert read(mnt / "cgroup.subtree_control") == "encids\n"
    assert stat.S_IMODE(os.stat(mnt / "a/encids.sev.max").st_mode) == 0o600
    assert not (mnt / "a/misc.max").exists()


def test_any_name_the_kernel_takes_is_kept(stateful):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    name = b"bad\xff name \x01"
    os.mkdir(os.fsencode(mnt) + b"/" + name)
    os.setxattr(os.fsencode(mnt) + b"/" + name, b"user.\xfe", b"\x00\xff")
    (mnt / "after").mkdir()  # the journal goes on
    kill_daemon(mnt)
    assert mount().returncode == 0
    assert sorted(entry for entry in os.listdir(os.fsencode(mnt))
                  if not entry.startswith((b"cgroup.", b"encids.", b"misc."))) == [b"after", name]
    assert os.getxattr(os.fsencode(mnt) + b"/" + name, b"user.\xfe") == b"\x00\xff"


# -- the file itself ------------------------------------------------------------------------------

def test_a_second_daemon_on_the_same_state_file_is_refused(stateful, tmp_path):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    result = encidfs("mount", str(other), "--state", str(state), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "in use by another encidfs daemon" in result.stderr
    assert mounted_fstype(other) is None
    (mnt / "still").mkdir()


def test_state_files_are_private_and_a_symlink_is_refused(stateful, tmp_path):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    (mnt / "a").mkdir()
    for path in (state, Path(f"{state}.log"), Path(f"{state}.lock")):
        assert oct(os.stat(path).st_mode & 0o777) == "0o600", path
    assert encidfs("umount", str(mnt)).returncode == 0
    link = tmp_path / "link.db"
    link.symlink_to(state)
    result = encidfs("mount", str(mnt), "--state", str(link), check=False)
    assert result.returncode == 1 and "symbolic link" in result.stderr


@pytest.mark.parametrize("damage", ["delete the log", "truncate the log",
                                    "replace the snapshot", "delete the snapshot"])
def test_damaged_files_lose_nothing_acknowledged(stateful, tmp_path, damage):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "before").mkdir()
    log = Path(f"{state}.log")
    if damage == "delete the log":
        log.unlink()
    elif damage == "truncate the log":
        os.truncate(log, log.stat().st_size - 1)
    elif damage == "replace the snapshot":
        shutil.copy(state, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", state)
    else:
        state.unlink()
    (mnt / "after").mkdir()  # acknowledged: in a file that is whole
    write(mnt / "after/encids.sev.max", "3")
    kill_daemon(mnt)
    assert mount().returncode == 0
    assert read(mnt / "after/encids.sev.max") == "3\n"
    assert (mnt / "before").is_dir()


# -- a disk that fills up, a file that cannot be written -------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs for the state file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk with a file; remove it to give the room back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def succeeds(action) -> bool:
    return outcome(action) == "OK"


def test_a_full_disk_refuses_changes_and_never_loses_one(tmp_path, small_disk, sleeps):
    mnt, state = tmp_path / "mnt", small_disk / "state.db"
    mnt.mkdir()
    assert encidfs("mount", str(mnt), "--state", str(state)).returncode == 0
    try:
        write(mnt / "cgroup.subtree_control", "+encids")
        (mnt / "a").mkdir()
        holder = sleeps()
        write(mnt / "a/cgroup.procs", str(holder.pid))
        with Client.connect(mount=str(mnt)) as client:
            kept = client.allocate("sev", pid=holder.pid)
            filler = fill(small_disk)
            refused = []
            for _ in range(400):  # until the log's last page is full (tmpfs has whole pages)
                try:
                    kept += client.allocate("sev", pid=holder.pid)
                except OSError as error:
                    refused.append(error.errno)
                    break
            assert refused == [errno.ENOSPC]
            assert outcome(lambda: (mnt / "p").mkdir()) == "ENOSPC"
            assert not (mnt / "p").exists()
            # Reads never fail for it.
            assert read(mnt / "a/encids.sev.current") != ""
            assert client.status()["ok"]
            filler.unlink()
            # Writes work again, with no restart (the file is tried again every second).
            wait_until(lambda: succeeds(lambda: (mnt / "p").mkdir()), "mkdir to work again")
            granted = client.allocate("sev", pid=holder.pid)
            status = {tuple(h["ids"]) for h in client.status()["holders"]}
        kill_daemon(mnt)
        assert encidfs("mount", str(mnt), "--state", str(state)).returncode == 0
        assert (mnt / "p").is_dir()
        with Client.connect(mount=str(mnt)) as client:
            assert {tuple(h["ids"]) for h in client.status()["holders"]} == status
        assert {*kept, *granted} == {id_ for ids in status for id_ in ids}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_read_only_state_file_refuses_changes_and_takes_them_again(tmp_path, small_disk):
    mnt, state = tmp_path / "mnt", small_disk / "state.db"
    mnt.mkdir()
    assert encidfs("mount", str(mnt), "--state", str(state)).returncode == 0
    try:
        (mnt / "a").mkdir()
        assert encidfs("umount", str(mnt)).returncode == 0
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        assert encidfs("mount", str(mnt), "--state", str(state)).returncode == 0
        assert outcome(lambda: (mnt / "b").mkdir()) == "EIO"
        assert not (mnt / "b").exists()
        with Client.connect(mount=str(mnt)) as client:
            with pytest.raises(OSError) as refused:
                client.allocate("sev")
            assert refused.value.errno == errno.EIO
            assert client.status()["ok"]
        assert read(mnt / "cgroup.stat").startswith("nr_descendants 1\n")
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        wait_until(lambda: succeeds(lambda: (mnt / "b").mkdir()), "mkdir to work again")
        kill_daemon(mnt)
        assert encidfs("mount", str(mnt), "--state", str(state)).returncode == 0
        assert sorted(p.name for p in mnt.iterdir() if p.is_dir()) == ["a", "b"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- upgrading ------------------------------------------------------------------------------------

DATA = Path(__file__).parent.parent / "data"


def test_a_state_file_of_the_first_release_is_upgraded_in_place(stateful, sleeps):
    """tests/data/state-v1.sql is a file written by encidfs 0.1 (schema 1): a tree with limits,
    modes, owners and xattrs; a holder of three IDs in /a/b, and one holding an ID charged to a
    cgroup removed since."""
    mnt, state, mount = stateful
    holder = sleeps()
    start = read_stat(holder.pid).start_time
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript((DATA / "state-v1.sql").read_text())
        with db:  # the fixture's first holder becomes a live process of this test
            db.execute("UPDATE allocations SET holder = ?, start = ? WHERE holder = 13404",
                       (holder.pid, start))
            db.execute("UPDATE members SET pid = ?, start = ?", (holder.pid, start))
    assert mount().returncode == 0
    assert read(mnt / "a/encids.sev.max") == "5\n"
    assert read(mnt / "a/b/encids.sev_es.max") == "7\n"
    assert read(mnt / "c/cgroup.max.depth") == "3\n"
    assert read(mnt / "a/cgroup.max.descendants") == "10\n"
    assert read(mnt / "c/cgroup.freeze") == "1\n"
    assert read(mnt / "a/cgroup.subtree_control") == "encids\n"
    assert oct(os.stat(mnt / "c").st_mode & 0o777) == "0o700"
    assert (os.stat(mnt / "a/b").st_uid, os.stat(mnt / "a/b/cgroup.procs").st_uid) == (1000, 1000)
    assert os.getxattr(mnt / "a", "user.note") == b"hello"
    assert os.getxattr(mnt / "a/encids.sev.max", "user.f") == b"1"
    assert pids(mnt / "a/b") == [holder.pid]
    assert read(mnt / "a/b/encids.sev.current") == "2\n"
    assert read(mnt / "a/b/encids.sev_es.current") == "1\n"
    assert "nr_dying_descendants 0" in read(mnt / "cgroup.stat")  # its holder is gone
    assert encidfs("umount", str(mnt)).returncode == 0
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert dict(db.execute("SELECT key, value FROM meta"))["schema"] == "4"
    assert mount().returncode == 0
    assert read(mnt / "a/encids.sev.max") == "5\n" and pids(mnt / "a/b") == [holder.pid]


def test_a_state_file_of_the_release_before_misc_is_upgraded_with_one_set_of_books(
        stateful, sleeps):
    """tests/data/state-v2.sql was written by the release before misc (schema 2, encids alone):
    a snapshot with a holder of three IDs in /a/b (pid 17902) and one of an ID charged to the
    removed /d (pid 17903), and a record after it (a/b's sev limit set to 4)."""
    mnt, state, mount = stateful
    holder = sleeps()
    start = read_stat(holder.pid).start_time
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript((DATA / "state-v2.sql").read_text())
        data = json.loads(db.execute("SELECT data FROM snapshot").fetchone()[0])
        # The fixture's holder becomes a live process of this test; the other is gone.
        data["starts"] = {str(holder.pid): start, "17903": data["starts"]["17903"]}
        engine = data["engine"]
        engine["members"] = [[holder.pid if pid == 17902 else pid, cg]
                             for pid, cg in engine["members"]]
        engine["charges"]["encids"] = [[css, t, holder.pid if pid == 17902 else pid, ids]
                                       for css, t, pid, ids in engine["charges"]["encids"]]
        with db:
            db.execute("UPDATE snapshot SET data = ?", (json.dumps(data),))
    assert mount().returncode == 0
    assert read(mnt / "cgroup.controllers") == "encids misc\n"
    assert read(mnt / "a/encids.sev.max") == "5\n"
    assert read(mnt / "a/b/encids.sev.max") == "4\n"  # the record after the snapshot
    assert read(mnt / "a/b/encids.sev_es.max") == "7\n"
    assert pids(mnt / "a/b") == [holder.pid]
    assert read(mnt / "a/b/encids.sev.current") == "2\n"
    assert "nr_dying_descendants 0" in read(mnt / "cgroup.stat")  # its holder is gone
    # misc's books start with what is held: at its root, as nothing enables it below.
    assert read(mnt / "misc.current") == "sev 2\nsev_es 1\n"
    assert read(mnt / "encids.sev.stat") == "total 509\nused 2\n"
    with Client.connect(mount=str(mnt)) as client:
        client.free([1], pid=holder.pid)
    assert read(mnt / "misc.current") == "sev 1\nsev_es 1\n"
    assert encidfs("umount", str(mnt)).returncode == 0
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert dict(db.execute("SELECT key, value FROM meta"))["schema"] == "4"
    assert mount().returncode == 0
    assert read(mnt / "misc.current") == "sev 1\nsev_es 1\n"


@pytest.mark.slow
def test_misc_limits_subtree_control_and_peaks_survive_a_restart(stateful, sleeps):
    mnt, state, mount = stateful
    assert mount().returncode == 0
    write(mnt / "cgroup.subtree_control", "+misc")
    (mnt / "a").mkdir()
    write(mnt / "a/misc.max", "sev 3")
    holder = sleeps()
    write(mnt / "a/cgroup.procs", str(holder.pid))
    with Client.connect(mount=str(mnt)) as client:
        client.free(client.allocate("sev", 3, pid=holder.pid), pid=holder.pid)
        with pytest.raises(OSError):
            client.allocate("sev", 4, pid=holder.pid)
    before = snapshot(mnt)
    assert before["a/misc.peak"] == "sev 3\nsev_es 0\n"
    assert before["a/misc.events"] == "sev.max 1\nsev_es.max 0\n"
    kill_daemon(mnt)
    assert mount().returncode == 0
    assert snapshot(mnt) == before
    assert encidfs("umount", str(mnt)).returncode == 0
    assert mount().returncode == 0
    assert snapshot(mnt) == before


# -- without --state: a runtime file ------------------------------------------------------------

@pytest.mark.slow
def test_without_state_a_crash_loses_nothing_and_umount_forgets(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert encidfs("mount", str(mnt)).returncode == 0
        write(mnt / "cgroup.subtree_control", "+encids")
        (mnt / "kept").mkdir()
        write(mnt / "kept/encids.sev.max", "2")
        kill_daemon(mnt)
        assert encidfs("mount", str(mnt)).returncode == 0
        assert read(mnt / "kept/encids.sev.max") == "2\n"
        assert encidfs("umount", str(mnt)).returncode == 0
        assert encidfs("mount", str(mnt)).returncode == 0
        assert not (mnt / "kept").exists()
    finally:
        if mounted_fstype(mnt) == FSTYPE:
            encidfs("umount", str(mnt), check=False)
