"""/proc/PID/stat read by encidfs/procs/procfs.py, on processes of the test's own."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from encidfs.procs import procfs
from encidfs.procs.procfs import alive, read_stat, state_of


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


def test_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a) b (c) 1 2"  # the name exec gives the process: its comm
    odd.symlink_to(shutil.which("sleep"))
    process = subprocess.Popen([odd, "600"])
    try:
        comm = Path(f"/proc/{process.pid}/comm")
        wait_until(lambda: comm.read_text() == "a) b (c) 1 2\n", "the exec")
        wait_until(lambda: state_of(process.pid) == "S", "sleep to sleep")
        stat = read_stat(process.pid)
        assert stat.ppid == os.getpid()
        assert stat.start_time >= read_stat(os.getpid()).start_time
        assert read_stat(process.pid, process.pid) == stat  # its one thread
        assert alive(process.pid)
    finally:
        process.kill()
        process.wait()


def test_a_zombie_has_exited_and_a_reaped_process_is_gone(sleeper):
    sleeper.kill()
    wait_until(lambda: state_of(sleeper.pid) == "Z", "the zombie")
    assert not alive(sleeper.pid)
    sleeper.wait()
    assert state_of(sleeper.pid) is None and not alive(sleeper.pid)
    with pytest.raises(FileNotFoundError):
        read_stat(sleeper.pid)


@pytest.fixture
def reaped_on_read(sleeper, monkeypatch) -> int:
    """The sleeper's PID, the sleeper reaped just after procfs opens its stat file."""
    def open_then_reap(path: str, mode: str):
        f = builtins.open(path, mode)
        sleeper.kill()
        sleeper.wait()
        return f

    monkeypatch.setattr(procfs, "open", open_then_reap, raising=False)
    return sleeper.pid


def test_a_process_reaped_between_the_open_and_the_read(reaped_on_read):
    with pytest.raises(ProcessLookupError):
        read_stat(reaped_on_read)


def test_a_process_reaped_between_the_open_and_the_read_has_no_state(reaped_on_read):
    assert state_of(reaped_on_read) is None


def test_a_process_reaped_between_the_open_and_the_read_is_not_alive(reaped_on_read):
    assert not alive(reaped_on_read)
