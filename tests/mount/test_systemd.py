"""systemd: the unit `encidfs unit` prints passes `systemd-analyze verify`, and the daemon
speaks the notification protocol (sd_notify(3)) to a socket the test owns, as systemd would
listen on it for a Type=notify service."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from mountutil import DEADLINE, FSTYPE, mounted_fstype, read

ENCIDFS = [sys.executable, "-m", "encidfs"]


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    unit = tmp_path / "encidfs.service"
    printed = subprocess.run([*ENCIDFS, "unit", "--mountpoint", "/run/encidfs"],
                             capture_output=True, text=True, check=True).stdout
    unit.write_text(printed)
    assert f"ExecStart={sys.executable} -m encidfs mount /run/encidfs --foreground " \
           "--state ${STATE_DIRECTORY}/state.db\n" in printed
    assert "Type=notify\n" in printed and "StateDirectory=encidfs\n" in printed
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_once_the_mount_answers_and_stopping_on_sigterm(tmp_path, abstract):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"\0encidfs-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    listener.bind(address)
    listener.settimeout(DEADLINE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "NOTIFY_SOCKET": "@" + address[1:] if abstract else address}
    daemon = subprocess.Popen([*ENCIDFS, "mount", str(mnt), "--foreground", "--capacity",
                               "sev=3"], env=env, stdin=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        ready = listener.recv(4096).decode().splitlines()
        # The mount answers by the time READY=1 is sent.
        assert mounted_fstype(mnt) == FSTYPE and read(mnt / "encids.sev.stat").startswith(
            "total 3\n")
        assert ready[0] == "READY=1"
        assert ready[1].startswith(f"STATUS=mounted on {mnt}: sev 3; 1 cgroups; ")
        daemon.send_signal(signal.SIGTERM)
        stopping = listener.recv(4096).decode().splitlines()
        assert stopping == ["STOPPING=1", f"STATUS=unmounting {mnt}"]
        assert daemon.wait(timeout=DEADLINE) == 0
        assert mounted_fstype(mnt) is None
    finally:
        listener.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
