"""The pytest plugin as a project sees it: run in a pytest of its own, on test files of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mountutil import DEADLINE, REPO, SITE, User, user_python


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
