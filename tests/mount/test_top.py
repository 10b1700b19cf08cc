"""`encidfs top` in a real terminal (tmux: start it, capture the pane, check the rows, send
`q`), and as text where the output is no terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from mountutil import DEADLINE, wait_until, write

from encidfs.client import Client, ControlError

TOP = [sys.executable, "-m", "encidfs", "top"]


@pytest.fixture
def tree(mnt, procs):
    """/vm1 (limit 4) with a sleep holding 3 sev IDs and one refusal; /vm2 empty."""
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "vm1").mkdir()
    (mnt / "vm2").mkdir()
    write(mnt / "vm1/encids.sev.max", "4")
    sleeper = procs.sleep()
    write(mnt / "vm1/cgroup.procs", str(sleeper.pid))
    with Client.connect(mount=str(mnt)) as client:
        client.allocate("sev", 3, pid=sleeper.pid)
        with pytest.raises(ControlError):
            client.allocate("sev", 3, pid=sleeper.pid)
    return mnt, sleeper


def columns(text: str) -> dict[str, list[str]]:
    """The rows of a view by cgroup: their words."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("/")}


def test_one_snapshot_as_text_sorted_by_usage(tree):
    mnt, _ = tree
    out = subprocess.run([*TOP, "--mount", str(mnt), "-n", "1"], capture_output=True,
                         text=True, timeout=DEADLINE, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == f"encidfs top: {mnt}   sev 3/509  sev_es 0/99"
    assert lines[1].split() == ["cgroup", "procs", "holders", "usage", "(current/limit)",
                                "refused"]
    assert [line.split()[0] for line in lines[2:]] == ["/", "/vm1", "/vm2"]
    assert columns(out)["/vm1"] == ["/vm1", "1", "1", "sev", "[########..]", "3/4", "sev_es",
                                    "[..........]", "0/99", "1"]
    assert columns(out)["/vm2"][1:3] == ["0", "0"] and "0/509" in columns(out)["/vm2"]


def test_a_live_view_in_a_terminal_refreshes_and_quits_on_q(tree, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    mnt, sleeper = tree
    tmux = ["tmux", "-L", f"encidfs-test-{os.getpid()}", "-f", "/dev/null"]
    command = " ".join([*TOP, "--mount", str(mnt), "-d", "0.1"])
    subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "20", command], check=True)
    try:
        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                  text=True).stdout

        def drawn() -> str | None:
            text = pane()
            return text if "/vm1" in text else None

        view = wait_until(drawn, "top to draw its rows")
        assert view.splitlines()[0].startswith(f"encidfs top: {mnt}")
        assert columns(view)["/vm1"][1:6] == ["1", "1", "sev", "[########..]", "3/4"]
        with Client.connect(mount=str(mnt)) as client:
            client.allocate("sev", 1, pid=sleeper.pid)
        wait_until(lambda: columns(pane()).get("/vm1", [])[3:6] == ["sev", "[##########]",
                                                                     "4/4"],
                   "the view to refresh")
        subprocess.run([*tmux, "send-keys", "q"], check=True)
        wait_until(lambda: subprocess.run([*tmux, "has-session"],
                                          capture_output=True).returncode != 0,
                   "top to quit on q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
