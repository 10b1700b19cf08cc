"""Process membership with real processes: the root's implicit members, fork inheritance,
threads, cgroup.kill, exits, holders in `encidfs status`, and `encidfs run --cgroup`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from mountutil import DEADLINE, events, nested, pids, read, wait_until, write

from encidfs.client import Client
from encidfs.procs.procfs import alive

ENCIDFS = [sys.executable, "-m", "encidfs"]

# A parent that forks a `sleep` child at once and another on each SIGUSR1, printing
# "child PID" for each; the children are the test's to kill (see `orphans`).
FORKER = r"""
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
def spawn():
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        os.execvp("sleep", ["sleep", "600"])
    print("child", pid, flush=True)
spawn()
while True:
    signal.sigwait({signal.SIGUSR1})
    spawn()
"""

# A process with three threads (the main one and two more), printing their TIDs.
THREADED = r"""
import threading, time
ready = threading.Barrier(3)
tids = []
def run():
    tids.append(threading.get_native_id())
    ready.wait()
    time.sleep(600)
for _ in range(2):
    threading.Thread(target=run, daemon=True).start()
ready.wait()
print(threading.get_native_id(), *tids, flush=True)
time.sleep(600)
"""


def move(pid, cg):
    write(cg / "cgroup.procs", str(pid))


def populated(cg):
    return events(cg)["populated"]


def encidfs(*args):
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, timeout=DEADLINE)


@pytest.fixture
def orphans():
    """PIDs of processes the test did not start itself (grandchildren): killed in teardown."""
    started: list[int] = []
    yield started
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def forker(procs, orphans):
    parent = procs.start([sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True)

    def next_child():
        word, pid = parent.stdout.readline().split()
        assert word == "child"
        orphans.append(int(pid))
        return int(pid)

    return parent, next_child


# -- the root's implicit members ----------------------------------------------------------------

def test_root_procs_lists_processes_that_are_in_no_child(mnt, procs):
    sleeper = procs.sleep()
    root = pids(mnt)
    assert 1 in root and os.getpid() in root and sleeper.pid in root
    (mnt / "a").mkdir()
    move(sleeper.pid, mnt / "a")
    assert sleeper.pid not in pids(mnt)
    assert 1 in pids(mnt)
    assert pids(mnt / "a") == [sleeper.pid]
    move(sleeper.pid, mnt)
    assert sleeper.pid in pids(mnt)
    assert pids(mnt / "a") == []


# -- fork inheritance -------------------------------------------------------------------------

@pytest.mark.parametrize("tracking", ["auto", "scan"])
def test_child_forked_by_a_member_is_a_member(mount_encidfs, procs, orphans, tracking):
    mnt = mount_encidfs("--tracking", tracking)
    a = mnt / "a"
    a.mkdir()
    parent, next_child = forker(procs, orphans)
    before = next_child()
    move(parent.pid, a)
    parent.send_signal(signal.SIGUSR1)
    after = next_child()
    wait_until(lambda: after in pids(a), f"the child {after} forked in /a to be in /a")
    assert sorted(pids(a)) == sorted([parent.pid, after])
    assert before in pids(mnt), "a child forked before its parent moved stays at the root"
    assert after not in pids(mnt)
    # Moved on, the parent forks into its new cgroup; its earlier child stays behind.
    b = mnt / "b"
    b.mkdir()
    move(parent.pid, b)
    parent.send_signal(signal.SIGUSR1)
    later = next_child()
    wait_until(lambda: later in pids(b), f"the child {later} forked in /b to be in /b")
    assert pids(b) == sorted([parent.pid, later])
    assert pids(a) == [after]


def test_grandchildren_are_members_too(mnt, procs, orphans):
    a = mnt / "a"
    a.mkdir()
    go_read, go_write = os.pipe()
    try:
        shell = procs.start(
            ["bash", "-c", f"read -u {go_read} go; bash -c 'sleep 600 & echo $!; wait' & "
                           "echo $!; wait"],
            stdout=subprocess.PIPE, text=True, pass_fds=[go_read])
        move(shell.pid, a)
        os.write(go_write, b"go\n")
        descendants = [int(shell.stdout.readline()) for _ in range(2)]  # child and grandchild
    finally:
        os.close(go_read)
        os.close(go_write)
    orphans.extend(descendants)
    wait_until(lambda: set(descendants) <= set(pids(a)), "the child and grandchild in /a")
    assert pids(a) == sorted([shell.pid, *descendants])
    assert not set(descendants) & set(pids(mnt))


@pytest.mark.parametrize("tracking", ["auto", "scan"])
def test_a_members_child_moved_to_the_root_stays_there(encidfs_factory, procs, tracking):
    """A child is placed once, at its fork: a later look at /proc (scan mode finds children
    by their parent) must not take it back to its parent's cgroup."""
    mnt = encidfs_factory(options=("--tracking", tracking)).path
    (mnt / "a").mkdir()
    shell = procs.start(["bash", "-c", "read go; sleep 600 & echo $!; read done"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    move(shell.pid, mnt / "a")
    shell.stdin.write("go\n")
    shell.stdin.flush()
    child = int(shell.stdout.readline())
    assert pids(mnt / "a") == sorted([shell.pid, child])
    move(child, mnt)  # to the root, where members are not listed
    for _ in range(2):
        assert pids(mnt / "a") == [shell.pid] and child in pids(mnt)
    os.kill(child, signal.SIGKILL)


def test_children_of_a_member_that_exits_at_once_stay_members(encidfs_factory, procs, orphans):
    """`echo $$ > a/cgroup.procs; cmd &` in a shell that then exits: the fork happened while
    the shell was a member, so the child belongs to /a even when the daemon learns of the
    shell's exit together with the fork (here forced by stopping the daemon meanwhile; under
    load it happens by itself).  The proc connector tells; a /proc scan cannot (README)."""
    daemon = encidfs_factory(options=("--tracking", "auto"))
    a = daemon.path / "a"
    a.mkdir()
    lost = []
    for _ in range(8):
        go_read, go_write = os.pipe()
        shell = procs.start(["bash", "-c", f"read -u {go_read} go; sleep 600 > /dev/null & "
                                           "echo $!"],
                            stdout=subprocess.PIPE, text=True, pass_fds=[go_read])
        os.close(go_read)
        move(shell.pid, a)
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            os.write(go_write, b"go\n")
            child = int(shell.stdout.readline())
            orphans.append(child)
            shell.wait(DEADLINE)
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
            os.close(go_write)
        if child not in pids(a):
            lost.append(child)
    assert lost == [], f"{len(lost)} of 8 children forked in /a ended up at the root"


def test_threads_of_a_member_are_listed_in_cgroup_threads(mnt, procs):
    a = mnt / "a"
    a.mkdir()
    process = procs.start([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    tids = [int(word) for word in process.stdout.readline().split()]
    assert len(set(tids)) == 3 and tids[0] == process.pid
    move(process.pid, a)
    assert pids(a) == [process.pid]
    assert pids(a, "cgroup.threads") == sorted(tids)
    root_threads = pids(mnt, "cgroup.threads")
    assert not set(tids) & set(root_threads)
    # Writing a thread's TID to cgroup.procs moves its whole process.
    move(tids[2], mnt)
    assert pids(a) == [] and pids(a, "cgroup.threads") == []
    assert set(tids) <= set(pids(mnt, "cgroup.threads"))


# -- cgroup.kill and exits --------------------------------------------------------------------

def test_kill_kills_the_whole_subtree(mnt, procs, orphans):
    a = mnt / "a"
    b = a / "b"
    b.mkdir(parents=True)
    in_a, in_b, outside = procs.sleep(), procs.sleep(), procs.sleep()
    move(in_a.pid, a)
    move(in_b.pid, b)
    parent, next_child = forker(procs, orphans)
    next_child()
    move(parent.pid, b)
    parent.send_signal(signal.SIGUSR1)
    forked = next_child()
    wait_until(lambda: forked in pids(b), "the forked child in /a/b")
    assert populated(a) == populated(b) == 1

    write(a / "cgroup.kill", "1")
    for process in (in_a, in_b, parent):
        assert process.wait(DEADLINE) == -signal.SIGKILL
    wait_until(lambda: not alive(forked), "the forked child to be killed too")
    wait_until(lambda: populated(b) == 0, "a/b to be unpopulated")
    wait_until(lambda: populated(a) == 0, "a to be unpopulated")
    assert pids(a) == [] and pids(b) == []
    assert outside.poll() is None, "cgroup.kill reached outside its subtree"


def test_exits_are_noticed_by_the_cgroup_and_its_ancestors(mnt, procs):
    a = mnt / "a"
    b = a / "b"
    b.mkdir(parents=True)
    first, second = procs.sleep(), procs.sleep()
    move(first.pid, b)
    move(second.pid, b)
    assert populated(b) == populated(a) == 1
    first.kill()
    wait_until(lambda: pids(b) == [second.pid], "the first member to leave a/b")
    assert populated(b) == populated(a) == 1
    second.kill()  # not reaped: a zombie is no member (the kernel unlinks it at exit)
    wait_until(lambda: populated(b) == 0, "a/b to be unpopulated after its last member exited")
    wait_until(lambda: populated(a) == 0, "a to be unpopulated after its last member exited")
    assert pids(b) == []
    b.rmdir()  # an unpopulated cgroup can go
    a.rmdir()


def test_exited_holder_leaves_no_holder_in_status(mnt, procs):
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    holder = procs.sleep()
    move(holder.pid, a)
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev", "--count", "2",
                     "--pid", str(holder.pid))
    assert result.stdout == "1\n2\n"
    status = encidfs("status", "--mount", str(mnt)).stdout
    assert "holders:" in status
    assert any(line.split()[:6] == ["pid", str(holder.pid), "sev", "/a", "1", "2"]
               for line in status.splitlines())
    holder.kill()
    wait_until(lambda: "holders:" not in encidfs("status", "--mount", str(mnt)).stdout,
               "the exited holder to leave `encidfs status`")
    with Client.connect(mount=mnt) as client:
        state = client.status()
    assert state["holders"] == []
    assert [c["procs"] for c in state["cgroups"] if c["path"] == "/a"] == [[]]


# -- encidfs status and run -------------------------------------------------------------------

def test_status_shows_the_tree_and_the_proc_connector(mount_encidfs, procs):
    mnt = mount_encidfs("--tracking", "auto")
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    write(a / "encids.sev.max", "1")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", pid=holder.pid)
    encidfs("alloc", "--mount", str(mnt), "--type", "sev", "--pid", str(holder.pid))
    result = encidfs("status", "--mount", str(mnt))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"mount: {mnt}   process tracking: proc connector"
    assert lines[1].startswith("capacities: sev 509  sev_es 99   from defaults: ")
    assert lines[2:6] == ["SEV enabled (ASIDs 1 - 509)", "SEV-ES enabled (ASIDs 510 - 608)",
                          "SEV-SNP enabled (ASIDs 510 - 608)", "controllers: encids misc"]
    root = lines.index(next(line for line in lines if line.startswith("/ ")))
    assert lines[root].split()[:4] == ["/", "encids:", "sev", "1/509"]
    assert lines[root + 1].split()[:3] == ["misc:", "sev", "1/509"]
    child = next(line.split() for line in lines if line.startswith("/a "))
    assert child[:8] == ["/a", "1", "procs", "encids:", "sev", "1/1", "refused", "1"]


def test_run_with_cgroup_moves_itself_there_first(mnt, procs):
    a, b = nested(mnt)
    runner = procs.start([*ENCIDFS, "run", "--mount", str(mnt), "--cgroup", "/a/b", "--type",
                          "sev", "--count", "2", "--print-ids", "--", "sleep", "600"],
                         stderr=subprocess.PIPE, text=True)
    assert runner.stderr.readline() == "1 2\n"
    assert pids(b) == [runner.pid]
    assert runner.pid not in pids(mnt)
    assert read(b / "encids.sev.current") == "2\n"
    assert read(a / "encids.sev.current") == "2\n"
    with Client.connect(mount=mnt) as client:
        holders = client.status()["holders"]
    assert [(h["pid"], h["cgroup"], h["ids"]) for h in holders] == [(runner.pid, "/a/b", [1, 2])]
    runner.kill()
    wait_until(lambda: populated(b) == 0, "a/b to be unpopulated after the command died")
    wait_until(lambda: read(b / "encids.sev.current") == "0\n", "the command's IDs to be freed")
    assert read(a / "encids.sev.current") == "0\n"
