"""Processes in cgroups: cgroup.procs and cgroup.threads, populated, the no-internal-process
rule, rmdir of populated cgroups, cgroup.kill and cgroup.freeze.

Every process here is one the test starts (`procs`); teardown kills and reaps them.  Whatever
the daemon notices asynchronously (an exit) is waited for by polling with a deadline.
`cg` is a fresh cgroup of a shared instance whose root enables encids."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time

import pytest
from mountutil import DEADLINE, events, outcome, pids, read, sh, wait_until, write, write_result

from encidfs.procs.procfs import read_stat, state_of

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207


def move(pid, cgroup):
    write(cgroup / "cgroup.procs", str(pid))


def unpopulated(*cgroups):
    wait_until(lambda: all(events(c)["populated"] == 0 for c in cgroups),
               f"{', '.join(c.name for c in cgroups)} to be unpopulated")


def threads_of(pid):
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- cgroup.procs ---------------------------------------------------------------------------

def test_a_moved_process_is_listed_in_its_cgroup_only(shared_mnt, cg, procs):
    (cg / "a").mkdir()
    sleeper = procs.sleep()
    assert sleeper.pid in pids(shared_mnt)
    move(sleeper.pid, cg / "a")
    assert pids(cg / "a") == [sleeper.pid]
    assert pids(cg) == []
    assert sleeper.pid not in pids(shared_mnt)
    assert sh(f"cat {cg}/a/cgroup.procs").stdout == f"{sleeper.pid}\n"


def test_moving_a_process_where_it_already_is_succeeds(cg, procs):
    sleeper = procs.sleep()
    move(sleeper.pid, cg)
    assert write_result(cg / "cgroup.procs", str(sleeper.pid)) == "OK"
    assert pids(cg) == [sleeper.pid]


def test_moving_between_cgroups_and_back_to_the_root(shared_mnt, cg, procs):
    (cg / "a").mkdir()
    (cg / "b").mkdir()
    sleeper = procs.sleep()
    move(sleeper.pid, cg / "a")
    move(sleeper.pid, cg / "b")
    assert (pids(cg / "a"), pids(cg / "b")) == ([], [sleeper.pid])
    assert events(cg / "a")["populated"] == 0
    assert events(cg)["populated"] == 1
    move(sleeper.pid, shared_mnt)
    assert pids(cg / "b") == []
    assert sleeper.pid in pids(shared_mnt)
    assert events(cg)["populated"] == 0


def test_populated_follows_a_member_up_to_every_ancestor(cg, procs):
    for name in ("a", "a/b", "c"):
        (cg / name).mkdir()
    sleeper = procs.sleep()
    move(sleeper.pid, cg / "a/b")
    assert read(cg / "a/b/cgroup.events") == "populated 1\nfrozen 0\n"
    assert events(cg / "a")["populated"] == 1
    assert events(cg)["populated"] == 1
    assert events(cg / "c")["populated"] == 0
    sleeper.kill()
    sleeper.wait()
    unpopulated(cg / "a/b", cg / "a", cg)
    assert pids(cg / "a/b") == []


def test_populated_drops_when_the_process_exits_even_unreaped(cg, procs):
    sleeper = procs.sleep()
    move(sleeper.pid, cg)
    sleeper.send_signal(signal.SIGKILL)  # a zombie until teardown reaps it
    unpopulated(cg)
    assert pids(cg) == []


def test_populated_change_wakes_a_poller_of_cgroup_events(cg, procs):
    fd = os.open(cg / "cgroup.events", os.O_RDONLY)
    try:
        os.read(fd, 100)
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        assert poller.poll(0) == []
        sleeper = procs.sleep()
        move(sleeper.pid, cg)
        ready = poller.poll(DEADLINE * 1000)
        assert ready and ready[0][1] & select.POLLPRI
        assert os.pread(fd, 100, 0) == b"populated 1\nfrozen 0\n"
    finally:
        os.close(fd)


def test_echo_0_moves_the_writing_shell(cg):
    (cg / "a").mkdir()
    script = f"echo 0 > {cg}/a/cgroup.procs && echo $$ && cat {cg}/a/cgroup.procs"
    lines = sh(script).stdout.split()
    shell = int(lines[0])
    assert shell in map(int, lines[1:])
    wait_until(lambda: pids(cg / "a") == [], "the shell's exit to be noticed")


def test_0_moves_the_opener_not_the_writer(mnt, procs):
    """A documented difference (README): the kernel moves the task that write()s "0", but FUSE
    does not tell the daemon who writes, so "0" means the process that opened the file."""
    (mnt / "a").mkdir()
    fd = os.open(mnt / "a/cgroup.procs", os.O_WRONLY)
    try:
        writer = procs.start(["bash", "-c", f'echo 0 >&{fd} && echo $$ && exec sleep 600'],
                             pass_fds=[fd], stdout=subprocess.PIPE, text=True)
        assert int(writer.stdout.readline()) == writer.pid
    finally:
        os.close(fd)
    assert pids(mnt / "a") == [os.getpid()]
    assert writer.pid in pids(mnt)


def test_a_process_forked_by_a_member_starts_in_its_cgroup(cg, procs):
    (cg / "a").mkdir()
    script = f"echo 0 > {cg}/a/cgroup.procs; sleep 600 & echo $!; wait"
    shell = procs.start(["bash", "-c", f"echo $$; {script}"], stdout=subprocess.PIPE, text=True)
    shell_pid, child = int(shell.stdout.readline()), int(shell.stdout.readline())
    try:
        wait_until(lambda: set(pids(cg / "a")) >= {shell_pid, child} or None,
                   "the forked sleep to be listed")
    finally:
        kill_quietly(child)
        shell.kill()


def test_a_thread_id_moves_its_whole_process(cg, procs):
    process, tid = procs.threaded()
    assert tid != process.pid
    move(tid, cg)
    assert pids(cg) == [process.pid]
    assert sorted(pids(cg, "cgroup.threads")) == threads_of(process.pid)
    assert tid in pids(cg, "cgroup.threads")


def test_threads_lists_the_thread_ids_of_every_member(cg, procs):
    (process, _), sleeper = procs.threaded(), procs.sleep()
    move(process.pid, cg)
    move(sleeper.pid, cg)
    assert sorted(pids(cg)) == sorted([process.pid, sleeper.pid])
    assert sorted(pids(cg, "cgroup.threads")) == sorted(threads_of(process.pid) + [sleeper.pid])


def test_a_thread_of_a_domain_moves_only_within_its_own_cgroup(cg, procs):
    """A domain cgroup is a domain of its own: cgroup.threads accepts a thread only where its
    process already is, EOPNOTSUPP elsewhere (test_threaded.py moves threads)."""
    process, tid = procs.threaded()
    assert write_result(cg / "cgroup.threads", str(tid)) == "EOPNOTSUPP"
    assert pids(cg) == []
    move(process.pid, cg)
    assert write_result(cg / "cgroup.threads", str(tid)) == "OK"
    assert write_result(cg / "cgroup.threads", str(process.pid)) == "OK"
    assert pids(cg) == [process.pid]


def test_a_pid_that_has_exited_is_esrch(cg, procs):
    done = procs.start(["true"])
    done.wait()
    assert write_result(cg / "cgroup.procs", str(done.pid)) == "ESRCH"


def test_a_kernel_thread_that_cannot_move_is_einval(cg):
    pf_no_setaffinity = 0x04000000
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            flags = read_stat(int(name)).flags
        except (FileNotFoundError, ProcessLookupError):
            continue
        if flags & pf_no_setaffinity:
            break
    else:
        pytest.skip("no kernel thread with PF_NO_SETAFFINITY is visible")
    assert write_result(cg / "cgroup.procs", name) == "EINVAL"
    assert pids(cg) == []


def test_moving_into_a_removed_cgroup_is_enodev(cg, procs):
    (cg / "a").mkdir()
    sleeper = procs.sleep()
    fd = os.open(cg / "a/cgroup.procs", os.O_WRONLY)
    try:
        os.rmdir(cg / "a")
        assert outcome(lambda: os.write(fd, str(sleeper.pid).encode())) == "ENODEV"
    finally:
        os.close(fd)


# -- the no-internal-process rule ---------------------------------------------------------------

def test_no_process_may_join_a_cgroup_that_enables_controllers(cg, procs):
    write(cg / "cgroup.subtree_control", "+encids")
    (cg / "a/b").mkdir(parents=True)
    write(cg / "a/cgroup.subtree_control", "+encids")
    sleeper = procs.sleep()
    assert write_result(cg / "a/cgroup.procs", str(sleeper.pid)) == "EBUSY"
    assert write_result(cg / "a/cgroup.threads", str(sleeper.pid)) == "EBUSY"
    assert write_result(cg / "a/cgroup.procs", "4194305") == "ESRCH"  # parsed and found first
    assert "Device or resource busy" in sh(
        f"echo {sleeper.pid} > {cg}/a/cgroup.procs", check=False).stderr
    move(sleeper.pid, cg / "a/b")  # a leaf below it is fine
    assert pids(cg / "a/b") == [sleeper.pid]


def test_a_cgroup_with_processes_may_not_enable_controllers(cg, procs):
    sleeper = procs.sleep()
    move(sleeper.pid, cg)
    assert write_result(cg / "cgroup.subtree_control", "+encids") == "EBUSY"
    assert read(cg / "cgroup.subtree_control") == ""
    assert write_result(cg / "cgroup.subtree_control", "-encids") == "OK"
    sleeper.kill()
    sleeper.wait()
    unpopulated(cg)
    assert write_result(cg / "cgroup.subtree_control", "+encids") == "OK"


def test_the_root_may_enable_controllers_with_processes(mnt, procs):
    procs.sleep()
    assert write_result(mnt / "cgroup.subtree_control", "+encids") == "OK"
    assert read(mnt / "cgroup.subtree_control") == "encids\n"


# -- rmdir of populated cgroups -----------------------------------------------------------------

def test_rmdir_of_a_populated_cgroup_is_ebusy_until_it_empties(cg, procs):
    (cg / "a").mkdir()
    sleeper = procs.sleep()
    move(sleeper.pid, cg / "a")
    assert outcome(lambda: os.rmdir(cg / "a")) == "EBUSY"
    assert sh(f"rmdir {cg}/a", check=False).returncode != 0
    sleeper.kill()
    sleeper.wait()
    unpopulated(cg / "a")
    os.rmdir(cg / "a")


# -- cgroup.kill --------------------------------------------------------------------------------

def test_kill_sigkills_every_process_of_the_subtree(cg, procs):
    for name in ("a", "a/b", "c"):
        (cg / name).mkdir()
    in_a, in_b, in_c = procs.sleep(), procs.sleep(), procs.sleep()
    move(in_a.pid, cg / "a")
    move(in_b.pid, cg / "a/b")
    move(in_c.pid, cg / "c")
    sh(f"echo 1 > {cg}/a/cgroup.kill")
    assert in_a.wait(timeout=DEADLINE) == -signal.SIGKILL
    assert in_b.wait(timeout=DEADLINE) == -signal.SIGKILL
    unpopulated(cg / "a/b", cg / "a")
    assert in_c.poll() is None
    assert pids(cg / "c") == [in_c.pid]


def test_kill_also_takes_down_forked_children(cg, procs):
    (cg / "a").mkdir()
    shell = procs.start(["bash", "-c", f"echo 0 > {cg}/a/cgroup.procs; sleep 600 & "
                         f"echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(shell.stdout.readline())
    try:
        wait_until(lambda: child in pids(cg / "a"), "the forked sleep to be listed")
        write(cg / "a/cgroup.kill", "1")
        assert shell.wait(timeout=DEADLINE) == -signal.SIGKILL
        unpopulated(cg / "a")
    finally:
        kill_quietly(child)


# -- cgroup.freeze ------------------------------------------------------------------------------

def test_freezing_an_empty_cgroup_is_frozen_at_once_and_so_are_new_children(cg):
    (cg / "a").mkdir()
    write(cg / "cgroup.freeze", "1")
    assert read(cg / "cgroup.events") == "populated 0\nfrozen 1\n"
    assert read(cg / "a/cgroup.events") == "populated 0\nfrozen 1\n"
    assert read(cg / "a/cgroup.freeze") == "0\n"  # its own setting
    (cg / "b").mkdir()
    assert events(cg / "b")["frozen"] == 1
    write(cg / "cgroup.freeze", "0")
    assert events(cg)["frozen"] == 0
    assert events(cg / "b")["frozen"] == 0


def test_freezing_a_populated_cgroup_freezes_its_processes(cg, procs):
    (cg / "a").mkdir()
    sleeper = procs.sleep()
    move(sleeper.pid, cg / "a")
    write(cg / "cgroup.freeze", "1")
    wait_until(lambda: events(cg)["frozen"] == 1, "the cgroup to be frozen")
    assert events(cg / "a") == {"populated": 1, "frozen": 1}
    latecomer = procs.sleep()
    move(latecomer.pid, cg / "a")
    wait_until(lambda: events(cg / "a")["frozen"] == 1, "the latecomer to be frozen")
    write(cg / "cgroup.freeze", "0")
    wait_until(lambda: events(cg)["frozen"] == 0, "the cgroup to thaw")
    assert sleeper.poll() is None and latecomer.poll() is None


def frozen_usec(cg):
    return int(read(cg / "cgroup.stat.local").removeprefix("frozen_usec ").rstrip("\n"))


def test_cgroup_stat_local_counts_the_time_spent_freezing(cg):
    """As on this machine's cgroup2: the time counts from the freeze, below too, whether or not
    `frozen` is reached; a cgroup made in a freezing parent counts from its mkdir; a thawed one
    keeps its total."""
    (cg / "a").mkdir()
    assert read(cg / "cgroup.stat.local") == "frozen_usec 0\n"
    write(cg / "cgroup.freeze", "1")
    wait_until(lambda: frozen_usec(cg / "a") > 0, "the child's freezing time to count")
    (cg / "b").mkdir()
    assert frozen_usec(cg / "b") < frozen_usec(cg / "a") <= frozen_usec(cg)
    write(cg / "cgroup.freeze", "0")
    totals = [frozen_usec(cg / name) for name in ("", "a", "b")]
    assert totals[0] > 0 and totals[2] > 0
    assert [frozen_usec(cg / name) for name in ("", "a", "b")] == totals  # stopped counting


def cpu_ticks(pid):
    stat = read_stat(pid)
    return stat.utime + stat.stime


def spinner(procs):
    return procs.start(["sh", "-c", "while :; do :; done"])


def frozen(cg):
    wait_until(lambda: events(cg)["frozen"] == 1, f"{cg.name} to be frozen")


def runs_once_thawed(cg, pid, ticks):
    """Thaw cg: the process, which had taken `ticks` so far, runs again."""
    write(cg / "cgroup.freeze", "0")
    wait_until(lambda: cpu_ticks(pid) > ticks, f"process {pid} to run once thawed")


def test_a_frozen_process_does_not_run_whoever_sends_sigcont(cg, procs):
    """The kernel's frozen tasks ignore SIGCONT: no CPU time at all, and frozen stays 1."""
    busy = spinner(procs)
    move(busy.pid, cg)
    write(cg / "cgroup.freeze", "1")
    frozen(cg)
    os.kill(busy.pid, signal.SIGCONT)
    ticks = cpu_ticks(busy.pid)
    deadline = time.monotonic() + 0.5  # a spinning process would take 50 ticks meanwhile
    while time.monotonic() < deadline:
        assert events(cg)["frozen"] == 1
        time.sleep(0.05)
    assert cpu_ticks(busy.pid) == ticks
    runs_once_thawed(cg, busy.pid, ticks)


def test_a_parent_does_not_see_its_child_frozen(cg, procs):
    """waitpid(WUNTRACED) reports no stop: the kernel's freezer is invisible to the parent."""
    child = procs.sleep()
    move(child.pid, cg)
    write(cg / "cgroup.freeze", "1")
    frozen(cg)
    assert os.waitpid(child.pid, os.WNOHANG | os.WUNTRACED) == (0, 0)
    write(cg / "cgroup.freeze", "0")
    wait_until(lambda: events(cg)["frozen"] == 0, "the cgroup to thaw")
    assert os.waitpid(child.pid, os.WNOHANG | os.WUNTRACED | os.WCONTINUED) == (0, 0)


def test_a_process_stopped_before_the_freeze_stays_stopped_after_the_thaw(cg, procs):
    """test_cgfreezer_stopped: SIGSTOP, freeze, thaw: still stopped (T), as the kernel leaves
    it; the freezer never resumes what it did not stop."""
    stopped = procs.sleep()
    move(stopped.pid, cg)
    os.kill(stopped.pid, signal.SIGSTOP)
    wait_until(lambda: state_of(stopped.pid) == "T", "the process to stop")
    assert events(cg)["frozen"] == 0
    write(cg / "cgroup.freeze", "1")
    frozen(cg)
    write(cg / "cgroup.freeze", "0")
    wait_until(lambda: events(cg)["frozen"] == 0, "the cgroup to thaw")
    wait_until(lambda: state_of(stopped.pid) == "T", "the process to be stopped as before")
    os.kill(stopped.pid, signal.SIGCONT)
    wait_until(lambda: state_of(stopped.pid) == "S", "the process to run again")


def test_a_process_another_tracer_holds_counts_as_frozen_and_is_left_to_it(cg, procs):
    """test_cgfreezer_ptraced: a process held in a trace stop by a debugger is frozen as it is
    (the freezer cannot trace it), and the thaw leaves it to the debugger."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    traced = procs.sleep()
    move(traced.pid, cg)
    assert libc.ptrace(PTRACE_SEIZE, traced.pid, None, None) == 0
    try:
        assert libc.ptrace(PTRACE_INTERRUPT, traced.pid, None, None) == 0
        os.waitpid(traced.pid, 0)
        assert events(cg)["frozen"] == 0
        write(cg / "cgroup.freeze", "1")
        frozen(cg)
        write(cg / "cgroup.freeze", "0")
        wait_until(lambda: events(cg)["frozen"] == 0, "the cgroup to thaw")
        assert state_of(traced.pid) == "t"  # still the debugger's
    finally:
        assert libc.ptrace(PTRACE_DETACH, traced.pid, None, None) == 0
    wait_until(lambda: state_of(traced.pid) == "S", "the process to run again")


def test_a_parent_waiting_in_vfork_counts_as_frozen_and_stops_as_it_returns(cg, procs,
                                                                          storm, shared_mnt):
    """test_cgfreezer_vfork: a parent in vfork() cannot take a signal, and the kernel counts it
    as frozen; back from vfork(), it does not run until the thaw."""
    parent = storm("vfork", 1)
    move(parent.pid, cg)
    (child,) = parent.go()
    move(child, shared_mnt)  # the child is not frozen: it goes on, and ends the vfork()
    write(cg / "cgroup.freeze", "1")
    frozen(cg)
    assert state_of(parent.pid) == "D"
    parent.process.stdin.write("exit\n")  # the child exits; the parent returns from vfork()
    parent.process.stdin.flush()
    wait_until(lambda: state_of(parent.pid) == "t", "the parent to stop as it returns")
    assert events(cg)["frozen"] == 1
    runs_once_thawed(cg, parent.pid, cpu_ticks(parent.pid))


def test_a_frozen_cgroup_can_still_be_killed(cg, procs):
    sleeper = procs.sleep()
    move(sleeper.pid, cg)
    write(cg / "cgroup.freeze", "1")
    frozen(cg)
    write(cg / "cgroup.kill", "1")
    assert sleeper.wait(timeout=DEADLINE) == -signal.SIGKILL
    unpopulated(cg)
