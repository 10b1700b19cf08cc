"""What the process watcher makes of /proc, on a fake /proc in tmp_path: its processes come,
turn zombie, go and come back as others at the test's word, without root or real processes.

PIDs are above any pid_max, so that no real process has them; the watcher gets no pidfd
budget, so it follows them by /proc alone, as it does past its budget."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from errnos import raises_errno

from encidfs.procs.procfs import Stat, alive, read_stat, state_of
from encidfs.procs.watcher import PF_NO_SETAFFINITY, ProcessWatcher

PID = 5_000_001  # pid_max is at most 2^22
OWN_NS = "pid:[4026531836]"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self" / "ns").mkdir(parents=True)
        (root / "self" / "ns" / "pid").symlink_to(OWN_NS)

    def process(self, pid: int, state: str = "S", start: int = 1000, comm: str = "sleep",
                tgid: int | None = None, flags: int = 0, uids: tuple[int, ...] = (0,) * 4,
                tid: int | None = None) -> None:
        """/proc/PID (or /proc/PID/task/TID) with its stat, status and PID namespace."""
        where = self.root / str(pid) if tid is None else self.root / str(pid) / "task" / str(tid)
        where.mkdir(parents=True, exist_ok=True)
        # proc(5)'s fields 3 to 22: state, ppid, ..., flags (9), utime (14), stime (15),
        # starttime (22).
        fields = [state, "1", "0", "0", "0", "-1", str(flags), "0", "0", "0", "0", "7", "3",
                  "0", "0", "20", "0", "1", "0", str(start)]
        (where / "stat").write_text(f"{tid or pid} ({comm}) {' '.join(fields)} 0 0\n")
        (where / "status").write_text(f"Name:\t{comm}\nTgid:\t{tgid or pid}\n"
                                      f"Uid:\t{' '.join(map(str, uids))}\n")
        (where / "ns").mkdir(exist_ok=True)
        if not (where / "ns" / "pid").is_symlink():
            (where / "ns" / "pid").symlink_to(OWN_NS)

    def gone(self, pid: int) -> None:
        for path in sorted((self.root / str(pid)).rglob("*"), reverse=True):
            path.unlink() if path.is_symlink() or path.is_file() else path.rmdir()
        (self.root / str(pid)).rmdir()


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def exits() -> list[int]:
    return []


@pytest.fixture
def watcher(proc, exits) -> ProcessWatcher:
    return ProcessWatcher(exits.append, proc=str(proc.root), pidfd_budget=0)


# -- the parser --------------------------------------------------------------------------------


def test_stat_is_read_after_the_last_parenthesis(proc):
    proc.process(PID, comm="a) b (c) 1 2", flags=0x40, start=4321)
    assert read_stat(PID, proc=str(proc.root)) == Stat("S", 1, 0x40, 7, 3, 4321)


def test_a_thread_has_a_stat_of_its_own(proc):
    proc.process(PID)
    proc.process(PID, state="Z", tid=PID + 1)
    assert state_of(PID, proc=str(proc.root)) == "S"
    assert state_of(PID, PID + 1, str(proc.root)) == "Z"
    assert not alive(PID, PID + 1, str(proc.root))


@pytest.mark.parametrize("state, lives", [("R", True), ("D", True), ("T", True),
                                          ("Z", False), ("X", False)])
def test_zombies_and_the_dead_have_exited(proc, state, lives):
    proc.process(PID, state=state)
    assert alive(PID, proc=str(proc.root)) is lives


def test_no_process_has_no_state(proc):
    assert state_of(PID, proc=str(proc.root)) is None
    with pytest.raises(FileNotFoundError):
        read_stat(PID, proc=str(proc.root))


# -- the watcher -------------------------------------------------------------------------------


def test_start_time_now_is_none_for_a_zombie_or_no_process(proc, watcher):
    proc.process(PID, start=77)
    proc.process(PID + 1, state="Z")
    assert [watcher.start_time_now(pid) for pid in (PID, PID + 1, PID + 2)] == [77, None, None]


def test_a_watched_process_exits_when_proc_shows_it_a_zombie(proc, watcher, exits):
    proc.process(PID, start=50)
    assert watcher.watch(PID) == 50
    watcher.settle()
    assert exits == [] and watcher.follows(PID, 50)
    proc.process(PID, state="Z", start=50)
    watcher.settle()
    assert exits == [PID] and not watcher.follows(PID, 50)


def test_a_pid_that_another_process_has_now_is_an_exit(proc, watcher, exits):
    proc.process(PID, start=50)
    watcher.watch(PID)
    proc.gone(PID)
    proc.process(PID, start=60)  # the PID reused between two looks
    watcher.settle()
    assert exits == [PID]
    assert watcher.watch(PID) == 60 and watcher.follows(PID, 60)


def test_a_process_restored_that_is_not_the_one_started_then_exits_at_once(proc, watcher,
                                                                             exits):
    proc.process(PID, start=60)
    watcher.resume({PID: 50})
    assert exits == [PID] and not watcher.follows(PID, 60)


def test_watching_a_zombie_is_its_exit(proc, watcher, exits):
    proc.process(PID, state="Z")
    assert watcher.watch(PID) is None
    assert exits == [PID]


def test_thread_group_of_a_thread_is_its_tgid(proc, watcher):
    proc.process(PID + 1, tgid=PID)
    assert watcher.thread_group(PID + 1) == PID


@pytest.mark.parametrize("make, code", [
    (lambda proc: None, errno.ESRCH),
    (lambda proc: proc.process(PID, flags=PF_NO_SETAFFINITY), errno.EINVAL),  # kthread
])
def test_thread_group_refusals(proc, watcher, make, code):
    make(proc)
    with raises_errno(code):
        watcher.thread_group(PID)


def test_owners_are_the_real_and_saved_uids(proc, watcher):
    proc.process(PID, uids=(1000, 0, 1001, 0))
    assert watcher.owners(PID) == (1000, 1001)
    with raises_errno(errno.ESRCH):
        watcher.owners(PID + 1)


def test_a_caller_in_the_daemons_namespace_names_pids_as_they_are(proc, watcher):
    proc.process(PID)
    assert watcher.pid_from(PID, 42) == 42
    assert watcher.pids_for(PID, [1, 2]) == [1, 2]
    assert not watcher.foreign(PID)
    assert watcher.foreign(PID + 1)  # gone: it sees nothing
    assert watcher.pids_for(PID + 1, [1, 2]) == [0, 0]
