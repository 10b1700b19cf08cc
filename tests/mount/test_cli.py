"""The encidfs command: configuration options as the mount shows them, errors as one line,
and `encidfs mount` / `encidfs umount` as a user runs them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import DEADLINE, FSTYPE, mounted_fstype, read, wait_until, write

from encidfs.client import Client
from encidfs.procs.procfs import alive

ENCIDFS = [sys.executable, "-m", "encidfs"]


def encidfs(*args):
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, timeout=DEADLINE,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def mountpoint(tmp_path):
    """An empty directory; whatever ends up mounted there is unmounted afterwards."""
    path = tmp_path / "mp"
    path.mkdir()
    yield path
    if mounted_fstype(path) == FSTYPE:
        try:
            pid = int(os.getxattr(path, "user.encidfs.pid"))
        except OSError:
            pid = None
        subprocess.run(["umount", str(path)], capture_output=True)
        if pid is not None:  # the daemon is not our child: its zombie counts as gone
            wait_until(lambda: not alive(pid), "the daemon to exit after umount")


# -- options --------------------------------------------------------------------------------

def test_capacity_options_make_exactly_those_types(mount_encidfs):
    mnt = mount_encidfs("--capacity", "sev=3", "--capacity", "tdx=7")
    assert sorted(n for n in os.listdir(mnt) if n.startswith("encids.")) == [
        "encids.sev.stat", "encids.tdx.stat"]
    assert read(mnt / "encids.sev.stat") == "total 3\nused 0\n"
    assert read(mnt / "encids.tdx.stat") == "total 7\nused 0\n"
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    assert sorted(n for n in os.listdir(mnt / "a") if n.startswith("encids.")) == [
        "encids.sev.current", "encids.sev.events", "encids.sev.max",
        "encids.tdx.current", "encids.tdx.events", "encids.tdx.max"]
    assert read(mnt / "a/encids.tdx.max") == "max\n"


def test_asids_split_into_sev_and_sev_es(mount_encidfs):
    mnt = mount_encidfs("--asids", "509", "--min-sev-asid", "100")
    assert read(mnt / "encids.sev.stat") == "total 410\nused 0\n"
    assert read(mnt / "encids.sev_es.stat") == "total 99\nused 0\n"


@pytest.mark.parametrize("toml, stats", [
    ("[capacity]\ntdx = 5\n", {"tdx": 5}),
    ("asids = 16\nmin_sev_asid = 5\n", {"sev": 12, "sev_es": 4}),
], ids=["capacity-table", "asids"])
def test_config_file(mount_encidfs, tmp_path, toml, stats):
    config = tmp_path / "encidfs.toml"
    config.write_text(toml)
    mnt = mount_encidfs("--config", str(config))
    assert sorted(n for n in os.listdir(mnt) if n.startswith("encids.")) == sorted(
        f"encids.{t}.stat" for t in stats)
    for t, total in stats.items():
        assert read(mnt / f"encids.{t}.stat") == f"total {total}\nused 0\n"


# -- errors: one line, exit status 1, no traceback, nothing mounted -----------------------------

def _config(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


ERROR_CASES = {
    "missing-mountpoint": lambda mp, tmp: [str(mp / "nope")],
    "non-empty-mountpoint": lambda mp, tmp: (mp / "file").touch() or [str(mp)],
    "mountpoint-is-a-file": lambda mp, tmp: (mp / "file").touch() or [str(mp / "file")],
    "capacity-without-count": lambda mp, tmp: [str(mp), "--capacity", "sev"],
    "capacity-not-a-number": lambda mp, tmp: [str(mp), "--capacity", "sev=x"],
    "capacity-upper-case-type": lambda mp, tmp: [str(mp), "--capacity", "SEV=1"],
    "capacity-negative": lambda mp, tmp: [str(mp), "--capacity", "sev=-1"],
    "capacity-without-type": lambda mp, tmp: [str(mp), "--capacity", "=5"],
    "config-not-toml": lambda mp, tmp: [str(mp), "--config", _config(tmp, "capacity = [\n")],
    "config-unknown-key": lambda mp, tmp: [str(mp), "--config", _config(tmp, "sev = 3\n")],
    "config-missing": lambda mp, tmp: [str(mp), "--config", str(tmp / "missing.toml")],
    "asids-alone": lambda mp, tmp: [str(mp), "--asids", "509"],
    "min-sev-asid-alone": lambda mp, tmp: [str(mp), "--min-sev-asid", "100"],
    "min-sev-asid-above-asids": lambda mp, tmp: [str(mp), "--asids", "5", "--min-sev-asid", "6"],
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_mount_errors_are_one_line_and_exit_1(mountpoint, tmp_path, case):
    result = encidfs("mount", *ERROR_CASES[case](mountpoint, tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encidfs: "), result.stderr
    assert result.stdout == ""
    assert mounted_fstype(mountpoint) is None


def test_mount_over_a_mounted_instance_is_refused(mnt):
    result = encidfs("mount", str(mnt))
    assert result.returncode == 1
    assert result.stderr.startswith("encidfs: ") and result.stderr.count("\n") == 1
    assert read(mnt / "cgroup.controllers") == "encids misc\n"  # still the first instance


def test_umount_of_something_else_is_refused(tmp_path):
    result = encidfs("umount", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("encidfs: ") and result.stderr.count("\n") == 1


# -- mount and umount -------------------------------------------------------------------------

def test_mount_returns_once_mounted_and_umount_stops_the_daemon(mountpoint):
    result = encidfs("mount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    # No waiting: the command returns only once the file system answers.
    assert mounted_fstype(mountpoint) == FSTYPE
    assert read(mountpoint / "cgroup.controllers") == "encids misc\n"
    pid = int(os.getxattr(mountpoint, "user.encidfs.pid"))
    assert f"(daemon pid {pid}, supervisor pid " in result.stdout
    assert alive(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"encidfs" in f.read()

    result = encidfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert mounted_fstype(mountpoint) is None
    assert not alive(pid)
    assert os.listdir(mountpoint) == []


def test_mount_command_passes_options_to_the_daemon(mountpoint):
    result = encidfs("mount", str(mountpoint), "--capacity", "tdx=4")
    assert result.returncode == 0, result.stderr
    assert read(mountpoint / "encids.tdx.stat") == "total 4\nused 0\n"
    assert encidfs("umount", str(mountpoint)).returncode == 0


def test_mount_takes_the_hosts_capacities_and_status_says_where_from(mountpoint, tmp_path):
    """A fake AMD host (tests/host has every case): kvm_amd with SEV and SEV-ES enabled, and a
    cpuid device whose Fn8000_001F says ASIDs 1..15, SEV from 5."""
    host = tmp_path / "host"
    parameters = host / "sys/module/kvm_amd/parameters"
    parameters.mkdir(parents=True)
    (parameters / "sev").write_text("Y\n")
    (parameters / "sev_es").write_text("Y\n")
    (host / "dev/cpu/0").mkdir(parents=True)
    with open(host / "dev/cpu/0/cpuid", "wb") as f:
        f.seek(0x8000001F)
        f.write(struct.pack("<4I", 0b1010, 0x33, 15, 5))
    env = {**os.environ, "ENCIDFS_HOST_ROOT": str(host)}
    run = subprocess.run([*ENCIDFS, "mount", str(mountpoint)], capture_output=True, text=True,
                         timeout=DEADLINE, stdin=subprocess.DEVNULL, env=env)
    assert run.returncode == 0, run.stderr
    assert read(mountpoint / "encids.sev.stat") == "total 11\nused 0\n"
    assert read(mountpoint / "encids.sev_es.stat") == "total 4\nused 0\n"
    status = encidfs("status", "--mount", str(mountpoint))
    assert f"capacities: sev 11  sev_es 4   from CPUID Fn8000_001F ({host}/dev/cpu/0/cpuid)" \
        in status.stdout, status.stdout
    with Client.connect(mount=str(mountpoint)) as client:
        assert client.allocate("sev") == [5]  # KVM's first SEV ASID
        assert client.allocate("sev_es") == [1]
    assert encidfs("umount", str(mountpoint)).returncode == 0


HELPER = Path("/sbin/mount.fuse.encidfs")


@pytest.fixture
def helper():
    """mount(8)'s helper, linked by scripts/install.sh to this checkout's encidfs."""
    ours = Path(sys.prefix, "bin", "encidfs").resolve()
    if not HELPER.exists() or HELPER.resolve() != ours:
        pytest.skip(f"{HELPER} is not linked to {ours} (scripts/install.sh, as root, does it)")


def test_mount_8_takes_every_setting_as_an_option_and_umount_8_stops_it(helper, mountpoint,
                                                                           tmp_path):
    state = tmp_path / "state.db"
    run = subprocess.run(
        ["mount", "-t", "fuse.encidfs", "encidfs", str(mountpoint), "-o",
         f"capacity=sev:3:tdx:2,controllers=encids,state={state},defaults,rw,nofail,_netdev,"
         "noauto,x-systemd.automount"], capture_output=True, text=True, timeout=DEADLINE)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")  # silent, as helpers are
    assert mounted_fstype(mountpoint) == FSTYPE
    assert read(mountpoint / "encids.tdx.stat") == "total 2\nused 0\n"
    assert read(mountpoint / "cgroup.controllers") == "encids\n"
    write(mountpoint / "cgroup.subtree_control", "+encids")
    (mountpoint / "a").mkdir()
    write(mountpoint / "a/encids.sev.max", "2")
    pid = int(os.getxattr(mountpoint, "user.encidfs.pid"))
    assert subprocess.run(["umount", str(mountpoint)]).returncode == 0
    wait_until(lambda: not alive(pid), "the daemon to stop after umount")
    assert integrity(state) == "ok"
    assert subprocess.run(["mount", "-t", "fuse.encidfs", "encidfs", str(mountpoint), "-o",
                           f"capacity=sev:3:tdx:2,controllers=encids,state={state}"],
                          timeout=DEADLINE).returncode == 0
    assert read(mountpoint / "a/encids.sev.max") == "2\n"  # the state, kept


def test_an_fstab_line_mounts(helper, mountpoint, tmp_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(f"encidfs {mountpoint} fuse.encidfs capacity=sev:4,controllers=misc,"
                     "nofail,_netdev 0 0\n")
    run = subprocess.run(["mount", "--fstab", str(fstab), str(mountpoint)],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert run.returncode == 0, run.stderr
    assert read(mountpoint / "misc.capacity") == "sev 4\n"


def test_fuse3s_mount_fuse_runs_encidfs_source_mountpoint_options(mountpoint):
    """Without the helper link, mount(8) falls back to mount.fuse, which runs `encidfs SOURCE
    MOUNTPOINT -o OPTIONS` from PATH."""
    mount_fuse = shutil.which("mount.fuse3", path="/sbin:/usr/sbin")
    if mount_fuse is None:
        pytest.skip("mount.fuse3 is not installed (package fuse3)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run([mount_fuse, "encidfs", str(mountpoint), "-t", "fuse.encidfs", "-o",
                          "capacity=sev:2,nofail"], env=env, capture_output=True, text=True,
                         timeout=DEADLINE)
    assert run.returncode == 0, run.stderr
    assert read(mountpoint / "encids.sev.stat") == "total 2\nused 0\n"


def test_a_bad_option_is_one_line_from_mount_8(helper, mountpoint):
    run = subprocess.run(["mount", "-t", "fuse.encidfs", "encidfs", str(mountpoint), "-o",
                          "capacity=sev"], capture_output=True, text=True, timeout=DEADLINE)
    assert run.returncode != 0
    assert run.stderr.startswith("encidfs: capacity=sev is not TYPE:N"), run.stderr
    assert mounted_fstype(mountpoint) is None


def integrity(state: Path) -> str:
    with contextlib.closing(sqlite3.connect(state)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def test_sigterm_unmounts_and_exits_cleanly(daemon):
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=DEADLINE) == 0
    assert mounted_fstype(daemon.path) is None
