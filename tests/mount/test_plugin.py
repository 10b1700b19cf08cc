"""The pytest plugin as a project sees it: run in a pytest of its own, on test files of its own;
and Mount.run through our own `encidfs` fixture."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import DEADLINE, REPO, SITE, User, keyed, pids, read, user_python, wait_until

from encidfs.client import ControlError


def run_pytest(directory: Path, source: str, *argv: str, user: User | None = None
               ) -> subprocess.CompletedProcess[str]:
    (directory / "test_project.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(directory), str(directory), *argv]
    if user is not None:
        directory.chmod(0o755)
        for parent in directory.parents:
            parent.chmod(parent.stat().st_mode | 0o001)  # traversable, as /tmp/pytest-of-root
        command = [*user.setpriv(), "env", "-i", "PATH=/usr/bin:/bin",
                   f"PYTHONPATH={REPO}:{SITE}", user_python(), *command[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=6 * DEADLINE,
                          cwd=directory)


@pytest.mark.slow
def test_a_daemon_that_dies_fails_its_test_with_its_log(tmp_path):
    done = run_pytest(tmp_path, '''
import os, signal

def test_kills_its_daemon(encidfs):
    (encidfs.path / "survivor").mkdir()
    os.kill(encidfs.process.pid, signal.SIGKILL)
''')
    assert done.returncode == 1, done.stdout
    assert "the daemon exited with -9" in done.stdout
    assert "mounted on" in done.stdout  # its last log lines
    assert "1 passed, 1 error" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_a_failing_test_reports_the_daemons_log(tmp_path):
    done = run_pytest(tmp_path, '''
def test_fails(encidfs):
    assert (encidfs.path / "cgroup.controllers").read_text() == "nothing"
''')
    assert done.returncode == 1
    assert "encidfs daemon log" in done.stdout and "mounted on" in done.stdout


def test_without_a_usable_dev_fuse_the_fixture_says_what_is_missing(tmp_path, user):
    """As a user on this host, where /dev/fuse is root's alone (mode 0600)."""
    done = run_pytest(tmp_path, '''
def test_needs_a_mount(encidfs):
    pass
''', user=user)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FUSE is not available to uid" in done.stdout and "0666" in done.stdout
    assert "Traceback" not in done.stdout


# -- Mount.run ------------------------------------------------------------------------------------

def test_run_becomes_the_command_in_its_cgroup_holding_the_ids(encidfs):
    (encidfs.path / "cgroup.subtree_control").write_text("+encids")
    (encidfs.path / "vm").mkdir()
    vm = encidfs.run("sleep", "600", count=2, cgroup="/vm")
    try:
        assert read(encidfs.path / "vm" / "encids.sev.current") == "2\n"
        assert pids(encidfs.path / "vm") == [vm.pid]
        wait_until(lambda: os.readlink(f"/proc/{vm.pid}/exe").endswith("/sleep"), "the exec")
    finally:
        vm.kill()
        vm.wait()
    wait_until(lambda: read(encidfs.path / "vm" / "encids.sev.current") == "0\n",
               "the killed command's IDs to be freed")


@pytest.mark.encidfs(capacity={"sev": 1, "sev_es": 1}, controllers=["encids"])
def test_a_run_over_the_capacity_raises_the_roots_refusal(encidfs, tmp_path):
    holder = encidfs.run("sleep", "600")
    started = tmp_path / "started"
    try:
        with pytest.raises(ControlError) as refused:
            encidfs.run("touch", str(started))
    finally:
        holder.kill()
        holder.wait()
    assert (refused.value.errno, refused.value.type, refused.value.cgroup,
            refused.value.controller) == (errno.EBUSY, "sev", "/", "encids")
    assert not started.exists()


def test_a_run_for_snp_guests_takes_their_own_ids(encidfs_factory):
    mount = encidfs_factory(capacity={"sev": 2, "sev_es": 4}, options=("--snp-asids", "2"))
    holder = mount.run("sleep", "600", type="sev_es", guest="snp", count=2)
    try:
        with pytest.raises(ControlError) as refused:  # SNP's IDs are all taken: no limit's
            mount.run("true", type="sev_es", guest="snp")
        assert (refused.value.errno, refused.value.cgroup) == (errno.EBUSY, None)
        with mount.client() as client:
            # sev_es's IDs follow sev's (3 - 6): SNP has the first two of them.
            assert [holder["ids"] for holder in client.status()["holders"]] == [[3, 4]]
    finally:
        holder.kill()
        holder.wait()


def test_a_run_of_an_unknown_type_raises_einval_naming_it(encidfs):
    with pytest.raises(ControlError) as refused:
        encidfs.run("true", type="tdx")
    assert (refused.value.errno, refused.value.type, refused.value.cgroup) == (
        errno.EINVAL, "tdx", None)
    assert keyed(read(encidfs.path / "encids.sev.stat"))["used"] == 0


def test_a_run_into_no_such_cgroup_raises_and_charges_nothing(encidfs):
    with pytest.raises(FileNotFoundError):
        encidfs.run("true", cgroup="/missing")
    assert keyed(read(encidfs.path / "encids.sev.stat"))["used"] == 0


def test_a_command_run_cannot_exec_exits_127_with_one_line(encidfs):
    missing = encidfs.run("encidfs-no-such-command", stderr=subprocess.PIPE, text=True)
    assert missing.wait(timeout=DEADLINE) == 127
    assert missing.stderr.read() == ("encidfs: encidfs-no-such-command: No such file or "
                                     "directory\n")
