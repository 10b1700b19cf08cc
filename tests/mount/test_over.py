"""`encidfs mount MNT --over DIR`: the kernel's own cgroup v2 tree with the encryption-ID
controllers added.

Each test makes a scratch cgroup of its own in this machine's cgroup v2 hierarchy (found from
mountinfo; the conftest's `scratch`), mounts over it, and removes it afterwards, killing what is
left in it: nothing else of the host's tree is touched.  What the kernel keeps is compared
with the kernel's own files (read beside the mount, in DIR), and what encidfs adds with what a
kernel's misc controller would say.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mountutil import (
    DEADLINE,
    USER_HELPERS,
    events,
    inotifywait_modify,
    keyed,
    outcome,
    pids,
    read,
    user_python,
    wait_until,
    write,
    write_result,
)

from encidfs.control.client import ControlError
from encidfs.over.tree import kernel_controllers


@pytest.fixture
def over(scratch: Path, encidfs_factory):
    return encidfs_factory(capacity={"sev": 8, "sev_es": 4}, options=("--over", str(scratch)))


def _emulated(scratch: Path) -> list[str]:
    return ["encids"] + ([] if "misc" in kernel_controllers(str(scratch)) else ["misc"])


def _kernel_files(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.is_file())


def _cpu_ns(pid: int) -> int:
    """The CPU time a process's threads have had, in nanoseconds (schedstat: exact, where
    /proc/PID/stat counts clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


# -- the tree and its files ---------------------------------------------------------------------

def test_every_kernel_file_passes_through_beside_the_emulated_ones(over, scratch):
    mnt = over.path
    listed = sorted(os.listdir(mnt))
    kernel = _kernel_files(scratch)
    assert set(kernel) <= set(listed)
    added = set(listed) - set(kernel)
    expected = {"encids.sev.stat", "encids.sev_es.stat"}
    if "misc" in _emulated(scratch):
        expected |= {"misc.capacity", "misc.current", "misc.peak"}
    assert added == expected  # the root-only ones: MNT's root is the ID space's root
    for name in kernel:
        mine, theirs = os.stat(mnt / name), os.stat(scratch / name)
        assert (mine.st_mode, mine.st_uid, mine.st_gid) == \
            (theirs.st_mode, theirs.st_uid, theirs.st_gid), name
    for name in ("cgroup.type", "cgroup.max.depth", "cgroup.events", "cgroup.freeze"):
        assert read(mnt / name) == read(scratch / name), name
    assert read(mnt / "cgroup.controllers").split() == \
        read(scratch / "cgroup.controllers").split() + _emulated(scratch)


def test_writes_and_errors_are_the_kernels(over, scratch):
    mnt = over.path
    assert write_result(mnt / "cgroup.max.depth", "3") == "OK"
    assert read(scratch / "cgroup.max.depth") == "3\n"
    for name, text in (("cgroup.max.depth", "-1"), ("cgroup.type", "bogus"),
                       ("cgroup.freeze", "2"), ("cgroup.kill", "0"), ("cgroup.procs", "x"),
                       ("cgroup.procs", "-5"), ("cgroup.procs", "999999999")):
        assert write_result(mnt / name, text) == write_result(scratch / name, text), (name, text)
    (scratch / "a").mkdir()
    assert outcome(lambda: os.rename(mnt / "a", mnt / "b")) == \
        outcome(lambda: os.rename(scratch / "a", scratch / "b"))
    assert outcome(lambda: (mnt / "a" / "new").touch()) == "EACCES"  # files are the kernel's


def test_cgroups_made_or_removed_by_anyone_appear_and_vanish_at_once(over, scratch):
    mnt = over.path
    (mnt / "a").mkdir(mode=0o750)
    assert (scratch / "a").is_dir()
    assert os.stat(mnt / "a").st_ino != os.stat(mnt).st_ino
    assert (os.stat(scratch / "a").st_mode & 0o777) == 0o750
    assert _kernel_files(scratch / "a") == [
        name for name in sorted(os.listdir(mnt / "a")) if not name.startswith(("encids.",
                                                                               "misc."))]
    (scratch / "b").mkdir()  # as systemd or runc would
    assert "b" in os.listdir(mnt)
    assert read(mnt / "b" / "cgroup.type") == "domain\n"
    (scratch / "b").rmdir()
    assert "b" not in os.listdir(mnt)
    assert outcome(lambda: os.stat(mnt / "b")) == "ENOENT"
    os.rmdir(mnt / "a")
    assert not (scratch / "a").exists()
    assert outcome(lambda: os.rmdir(mnt / "cgroup.procs")) == "ENOTDIR"
    assert outcome(lambda: os.mkdir(mnt / "encids.sev.stat")) == "EEXIST"


def test_inotify_sees_the_kernels_notifications(over, scratch, procs):
    """cgroup.events changed by the kernel's doing (a process exits) reaches inotify watchers
    of the mount, as systemd and the containerd cgroups library watch it."""
    mnt = over.path
    (mnt / "a").mkdir()
    sleeper = procs.sleep()
    write(mnt / "a" / "cgroup.procs", str(sleeper.pid))
    events_file = mnt / "a" / "cgroup.events"
    out = inotifywait_modify(events_file, sleeper.kill)  # the kernel's doing alone
    assert out == f"{events_file} MODIFY\n"
    assert events(mnt / "a")["populated"] == 0


# -- membership: the kernel's, exactly -------------------------------------------------------------

def test_forks_clone_parent_threads_and_exits_are_the_kernels(over, scratch, storm, procs):
    mnt = over.path
    (mnt / "a").mkdir()
    forker = storm("siblings", 3)
    write(mnt / "a" / "cgroup.procs", str(forker.pid))
    siblings = forker.go()  # children of this test, made by a process in /a
    try:
        assert pids(mnt / "a") == pids(scratch / "a") == sorted([forker.pid, *siblings])
        for pid in siblings:
            assert read(f"/proc/{pid}/cgroup").endswith(f"{scratch.name}/a\n")
        threaded, tid = procs.threaded()
        write(mnt / "a" / "cgroup.procs", str(threaded.pid))
        assert {threaded.pid, tid} <= set(pids(mnt / "a", "cgroup.threads"))
        assert pids(mnt / "a", "cgroup.threads") == pids(scratch / "a", "cgroup.threads")
        forker.end()
    finally:
        for pid in siblings:
            os.waitpid(pid, 0)
    threaded.kill()
    threaded.wait()
    assert pids(mnt / "a") == pids(scratch / "a") == []
    assert events(mnt / "a") == {"populated": 0, "frozen": 0}


@pytest.mark.parametrize("mode, forks", [("flat", 5000), ("exec", 1000), ("daemons", 100)])
@pytest.mark.slow
def test_a_storm_leaves_the_books_exact_at_no_cost_per_fork(over, scratch, storm, mode, forks):
    """A build's worth of processes (forks, fork and exec, double-forking daemons) in a cgroup:
    the kernel keeps the books, the daemon spends nothing per process."""
    mnt = over.path
    (mnt / "a").mkdir()
    forker = storm(mode, forks)
    write(mnt / "a" / "cgroup.procs", str(forker.pid))
    before = _cpu_ns(over.process.pid)
    daemons = forker.go()
    spent = _cpu_ns(over.process.pid) - before
    print(f"daemon CPU during {forks} {mode} processes: {spent / 1e6:.2f} ms "
          f"({spent / forks:.0f} ns a process)")
    # Nothing per process: what the daemon does meanwhile is its own (the standalone tree
    # spends some 30 us a fork, 150 ms for 5,000).
    assert spent < 5_000_000
    assert pids(mnt / "a") == pids(scratch / "a") == sorted([forker.pid, *daemons])
    forker.end()
    wait_until(lambda: pids(mnt / "a") == [], "the storm's processes to exit")


def test_the_freezer_and_kill_are_the_kernels(over, scratch, procs):
    mnt = over.path
    (mnt / "a").mkdir()
    sleeper = procs.sleep()
    write(mnt / "a" / "cgroup.procs", str(sleeper.pid))
    fd = os.open(mnt / "a" / "cgroup.events", os.O_RDONLY)
    try:
        os.read(fd, 4096)
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        write(mnt / "a" / "cgroup.freeze", "1")
        assert poller.poll(DEADLINE * 1000), "poll(2) did not wake for frozen"
        wait_until(lambda: events(scratch / "a")["frozen"] == 1, "the kernel to freeze /a")
        assert events(mnt / "a")["frozen"] == 1
        assert keyed(read(mnt / "a" / "cgroup.stat.local"))["frozen_usec"] >= 0
        write(mnt / "a" / "cgroup.freeze", "0")
        wait_until(lambda: events(mnt / "a")["frozen"] == 0, "the kernel to thaw /a")
    finally:
        os.close(fd)
    write(mnt / "a" / "cgroup.kill", "1")
    assert sleeper.wait(timeout=DEADLINE) == -9


# -- the merged cgroup.controllers and cgroup.subtree_control -------------------------------------

def test_subtree_control_merges_and_applies_all_or_nothing(over, scratch, procs):
    mnt = over.path
    kernel = read(scratch / "cgroup.subtree_control").split()
    assert write_result(mnt / "cgroup.subtree_control", "+encids +nosuch") == "EINVAL"
    assert read(mnt / "cgroup.subtree_control").split() == kernel
    offered = read(scratch / "cgroup.controllers").split()
    missing = [name for name in kernel_controllers(str(scratch))
               if name not in offered and name != "misc"]
    if missing:  # a kernel controller the parent does not offer: the kernel's ENOENT
        assert write_result(mnt / "cgroup.subtree_control", f"+encids +{missing[0]}") == \
            "ENOENT"
        assert "encids" not in read(mnt / "cgroup.subtree_control")
    some = (missing or offered or ["memory"])[0]
    assert write_result(mnt / "cgroup.subtree_control", f"-{some} +encids") == "OK"
    assert read(mnt / "cgroup.subtree_control").split() == kernel + ["encids"]
    assert read(scratch / "cgroup.subtree_control").split() == kernel
    (mnt / "a").mkdir()
    assert read(mnt / "a" / "cgroup.controllers").split()[-1] == "encids"
    assert read(mnt / "a" / "encids.sev.max") == "max\n"
    sleeper = procs.sleep()
    write(scratch / "a" / "cgroup.procs", str(sleeper.pid))
    # The no-internal-process rule, from the kernel's membership.
    assert write_result(mnt / "a" / "cgroup.subtree_control", f"-{some} +encids") == "EBUSY"
    (mnt / "a" / "b").mkdir()
    write(scratch / "cgroup.procs", str(sleeper.pid))
    write(mnt / "a" / "cgroup.subtree_control", "+encids")
    # ... and no process joins a cgroup that enables one (cgroup_migrate_vet_dst()).
    assert write_result(mnt / "a" / "cgroup.procs", str(sleeper.pid)) == "EBUSY"
    assert write_result(mnt / "a" / "b" / "cgroup.procs", str(sleeper.pid)) == "OK"
    write(mnt / "a" / "cgroup.subtree_control", "-encids")
    assert write_result(mnt / "cgroup.subtree_control", "-encids") == "OK"
    assert not (mnt / "a" / "encids.sev.max").exists()
    # DIR is a cgroup below the kernel's root: the rule holds for it too.
    write(scratch / "cgroup.procs", str(sleeper.pid))
    assert write_result(mnt / "cgroup.subtree_control", "+encids") == "EBUSY"
    write(scratch / "a" / "b" / "cgroup.procs", str(sleeper.pid))
    assert write_result(mnt / "cgroup.subtree_control", "+encids") == "OK"
    # A threaded subtree takes no domain controller, the kernel's or an emulated one.
    write(scratch / "cgroup.procs", str(sleeper.pid))
    write(mnt / "a" / "cgroup.subtree_control", "+encids")
    assert write_result(mnt / "a" / "b" / "cgroup.type", "threaded") == "EOPNOTSUPP"
    assert read(scratch / "a" / "b" / "cgroup.type") == "domain\n"
    write(mnt / "a" / "cgroup.subtree_control", "-encids")
    write(mnt / "a" / "b" / "cgroup.type", "threaded")
    assert read(mnt / "a" / "cgroup.type") == "domain threaded\n"
    assert write_result(mnt / "a" / "cgroup.subtree_control", "+encids") == "EOPNOTSUPP"


# -- charges ---------------------------------------------------------------------------------------

def test_an_allocation_charges_the_holders_real_cgroup(over, scratch, procs):
    mnt = over.path
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    write(mnt / "a" / "encids.sev.max", "2")
    holder = procs.sleep()
    write(scratch / "a" / "cgroup.procs", str(holder.pid))  # moved by the kernel alone
    client = over.client()
    assert client.allocate("sev", 2, pid=holder.pid).cgroup == "/a"
    assert read(mnt / "a" / "encids.sev.current") == "2\n"
    with pytest.raises(ControlError) as refused:
        client.allocate("sev", 1, pid=holder.pid)
    assert refused.value.errno == errno.EBUSY
    assert read(mnt / "a" / "encids.sev.events") == "max 1\n"
    write(scratch / "b" / "cgroup.procs", str(holder.pid))
    assert read(mnt / "a" / "encids.sev.current") == "2\n"  # the charge stays where it was made
    client.allocate("sev", 1, pid=holder.pid)
    assert read(mnt / "b" / "encids.sev.current") == "1\n"
    holder.kill()
    holder.wait()
    wait_until(lambda: read(mnt / "a" / "encids.sev.current") == "0\n"
               and read(mnt / "b" / "encids.sev.current") == "0\n", "the holder's IDs freed")
    assert keyed(read(mnt / "encids.sev.stat")) == {"total": 8, "used": 0}


def test_a_cgroup_removed_elsewhere_keeps_its_charges_until_freed(over, scratch, procs):
    mnt = over.path
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    write(mnt / "a" / "encids.sev.max", "3")
    holder = procs.sleep()
    write(scratch / "a" / "cgroup.procs", str(holder.pid))
    over.client().allocate("sev", 1, pid=holder.pid)
    write(scratch / "cgroup.procs", str(holder.pid))
    (scratch / "a").rmdir()  # by someone else, while charged
    assert "a" not in os.listdir(mnt)
    assert keyed(read(mnt / "encids.sev.stat"))["used"] == 1  # a dying cgroup's charge
    (scratch / "a").mkdir()  # a new cgroup at the same path starts afresh
    assert read(mnt / "a" / "encids.sev.max") == "max\n"
    assert read(mnt / "a" / "encids.sev.current") == "0\n"
    (holder_entry,) = over.client().status()["holders"]
    assert holder_entry["cgroup"] == "/a" and holder_entry["pid"] == holder.pid
    holder.kill()
    holder.wait()
    wait_until(lambda: keyed(read(mnt / "encids.sev.stat"))["used"] == 0, "the charge freed")


def test_limits_and_holders_survive_a_restart(scratch, encidfs_factory, procs):
    mount = encidfs_factory(capacity={"sev": 8, "sev_es": 4}, state=True,
                            options=("--over", str(scratch)))
    mnt = mount.path
    write(mnt / "cgroup.subtree_control", "+encids")
    for name in ("a", "b"):
        (mnt / name).mkdir()
    write(mnt / "a" / "encids.sev.max", "3")
    write(mnt / "b" / "encids.sev.max", "5")
    os.chmod(mnt / "a" / "encids.sev.max", 0o664)
    holder, gone = procs.sleep(), procs.sleep()
    write(scratch / "a" / "cgroup.procs", str(holder.pid))
    mount.client().allocate("sev", 2, pid=holder.pid)
    mount.client().allocate("sev", 3, pid=gone.pid)
    mount.process.kill()
    mount.process.wait()
    gone.kill()  # a holder that exits while the daemon is down
    gone.wait()
    (scratch / "b").rmdir()  # gone while the daemon was down
    (scratch / "c").mkdir()  # made meanwhile
    mount.restart()
    assert read(mnt / "a" / "encids.sev.max") == "3\n"
    mount.restart()  # from the checkpoint the first restore wrote, not from the journal
    limit = os.stat(mnt / "a" / "encids.sev.max")
    # The mode kept; the times the restarted daemon's own, as on the standalone tree.
    assert stat.S_IMODE(limit.st_mode) == 0o664 and limit.st_mtime > time.time() - 600
    assert read(mnt / "a" / "encids.sev.current") == "2\n"
    assert keyed(read(mnt / "encids.sev.stat"))["used"] == 2  # the gone holder's 3 are free
    assert read(mnt / "cgroup.subtree_control").split()[-1] == "encids"
    assert sorted(p.name for p in mnt.iterdir() if p.is_dir()) == ["a", "c"]
    assert read(mnt / "c" / "encids.sev.max") == "max\n"
    assert "1 of those restored were gone" in mount.log
    holder.kill()
    holder.wait()
    wait_until(lambda: read(mnt / "a" / "encids.sev.current") == "0\n", "the IDs freed")


# -- delegation ------------------------------------------------------------------------------

USER_MOVES = USER_HELPERS + r"""
import sys
import time
mnt, pid = sys.argv[1], sys.argv[2]
print(mkdir(f"{mnt}/del/x"))
print(write(f"{mnt}/del/x/cgroup.procs", pid))
print(write(f"{mnt}/del/cgroup.subtree_control", "+encids"))
print(write(f"{mnt}/cgroup.procs", pid))
print(write(f"{mnt}/del/encids.sev.max", "1"))
print(write(f"{mnt}/del/x/encids.sev.max", "1"))
"""


def test_a_delegatee_acts_within_the_kernels_rules(over, scratch, procs, user, traversable):
    mnt = traversable(over.path)
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "del").mkdir()
    for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        os.chown(scratch / "del" / name, user.uid, user.gid)  # as systemd's Delegate=yes
    process = procs.start([*user.setpriv(), "sleep", "600"])
    wait_until(lambda: read(f"/proc/{process.pid}/status").count(f"\t{user.uid}\t") > 0,
               "the user's process")
    write(scratch / "del" / "cgroup.procs", str(process.pid))
    assert os.stat(mnt / "del" / "encids.sev.max").st_uid == 0  # as memory.max would be
    result = subprocess.run([*user.setpriv(), user_python(), "-I", "-S", "-c", USER_MOVES,
                             str(mnt), str(process.pid)], capture_output=True, text=True,
                            timeout=DEADLINE, cwd="/")
    assert result.stdout.split("\n")[:6] == [
        "OK",  # mkdir in the delegated cgroup: the new one is the user's
        "OK",  # a move within the delegated subtree
        "OK",  # the delegated cgroup's subtree_control is the user's
        os.strerror(errno.EACCES),  # out of it: the common ancestor's cgroup.procs is root's
        os.strerror(errno.EACCES),  # the delegated cgroup's own limit is its parent's to set
        "OK",  # a limit in a cgroup the user made
    ], result.stderr
    assert os.stat(scratch / "del" / "x").st_uid == user.uid
    assert os.stat(scratch / "del" / "x" / "cgroup.procs").st_uid == user.uid
    assert pids(scratch / "del" / "x") == [process.pid]
    assert read(mnt / "del" / "x" / "encids.sev.max") == "1\n"


def test_under_exec_proc_cgroup_says_the_mounts_paths(over, scratch):
    """encidfs exec gives the command a cgroup namespace rooted at DIR: a process in the
    mount's tree reads its path in the mount from /proc/self/cgroup, as runc and systemd do."""
    mnt = over.path
    (mnt / "a").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "encidfs", "exec", "--mount", str(mnt), "--", "sh", "-c",
         "grep ^0:: /proc/self/cgroup; echo $$ > /sys/fs/cgroup/a/cgroup.procs; "
         "grep ^0:: /proc/self/cgroup; sh -c 'grep ^0:: /proc/self/cgroup'"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0::/..", "0::/a", "0::/a"]  # outside DIR at first
    assert read(scratch / "cgroup.procs") == ""  # the namespace's helper is gone
    refused = subprocess.run([sys.executable, "-m", "encidfs", "exec", "--mount", str(mnt),
                              "--proc-cgroup", "--", "true"], capture_output=True, text=True,
                             timeout=DEADLINE)
    assert (refused.returncode, refused.stderr) == (1, "encidfs: --proc-cgroup is for the "
                                                       "standalone tree: over a cgroup, "
                                                       "/proc/PID/cgroup is the kernel's own\n")


def test_open_kernel_files_are_bounded_per_user(scratch, encidfs_factory, user, traversable):
    """Each kernel file open through the mount holds a descriptor of the daemon's: a user may
    hold a quarter of those the daemon sets aside for them (here, with 1024 descriptors: 64),
    and then gets ENFILE, while the emulated files and everyone else go on."""
    mount = encidfs_factory(options=("--over", str(scratch)), nofile=(1024, 1024))
    script = ("import os, sys\n"
              "held = []\n"
              "while len(held) < 1000:\n"
              "    try:\n"
              f"        held.append(os.open({str(mount.path / 'cgroup.procs')!r}, os.O_RDONLY))\n"
              "    except OSError as error:\n"
              "        print(len(held), error.errno, flush=True)\n"
              "        break\n"
              f"print(open({str(mount.path / 'encids.sev.stat')!r}).read().split()[0],"
              " flush=True)\n"
              "sys.stdin.read()\n")
    traversable(mount.path)
    holder = subprocess.Popen([*user.setpriv(), user_python(), "-c", script], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().split() == ["64", str(errno.ENFILE)]
        assert holder.stdout.readline() == "total\n"  # an emulated file holds none
        with open(mount.path / "cgroup.procs") as f:  # the owner is served
            f.read()
    finally:
        holder.communicate("")
    assert read(mount.path / "cgroup.type") == read(scratch / "cgroup.type")
