"""Intel TDX, the misc controller's `tdx` since Linux 6.16: a host whose misc.capacity lists tdx
mounts with it, and tdx IDs are limited, counted, held and reported as the others are."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mountutil import DEADLINE, keyed, read, wait_until, write

from encidfs.pytest_plugin import Mount

ENCIDFS = [sys.executable, "-m", "encidfs"]


def encidfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, timeout=DEADLINE,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def on_host(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """on_host(misc_capacity, tdx), once a test: a mount whose capacities are detected on a fake
    host with that misc.capacity (None: none) and kvm_intel's tdx parameter.  The plugin's Mount
    detects on the directory `host` beside its mountpoint."""
    mounts: list[Mount] = []

    def mount(misc_capacity: str | None, tdx: str) -> Mount:
        host = tmp_path / "host"
        parameters = host / "sys/module/kvm_intel/parameters"
        parameters.mkdir(parents=True)
        (parameters / "tdx").write_text(tdx + "\n")
        if misc_capacity is not None:
            (host / "sys/fs/cgroup").mkdir(parents=True)
            (host / "sys/fs/cgroup/misc.capacity").write_text(misc_capacity)
        mounts.append(Mount(tmp_path / "mnt", tmp_path / "encidfs.log", ()))
        return mounts[-1].wait_mounted()

    yield mount
    problems = [problem for mount in mounts for problem in mount.stop()]
    assert not problems, "; ".join(problems)


def test_a_tdx_host_mounts_with_tdx_alone(on_host, tmp_path, procs):
    mount = on_host("tdx 31\n", tdx="Y")
    mnt = mount.path
    assert read(mnt / "misc.capacity") == "tdx 31\n"
    assert sorted(n for n in mnt.iterdir() if n.name.startswith("encids.")) == [
        mnt / "encids.tdx.stat"]
    assert read(mnt / "encids.tdx.stat") == "total 31\nused 0\n"
    status = encidfs("status", "--mount", str(mnt))
    assert (f"capacities: tdx 31   from {tmp_path}/host/sys/fs/cgroup/misc.capacity\n"
            in status.stdout), status.stdout
    assert "note:" not in status.stdout and "WARNING" not in mount.log
    holder = str(procs.sleep().pid)
    result = encidfs("alloc", "--mount", str(mnt), "--type", "tdx", "--pid", holder)
    assert (result.returncode, result.stdout) == (0, "1\n")
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev", "--pid", holder)
    assert (result.returncode, result.stderr) == (
        1, "encidfs: sev: EINVAL: Invalid argument: unknown resource type 'sev'\n")


def test_tdx_on_in_kvm_intel_without_a_misc_capacity_is_said(on_host, tmp_path):
    mount = on_host(None, tdx="Y")
    note = (f"kvm_intel has TDX enabled ({tmp_path}/host/sys/module/kvm_intel/parameters/tdx) "
            "but no misc.capacity this daemon can read lists tdx IDs: the mount has no tdx "
            "(give --capacity tdx=N)")
    assert f" WARNING {note}\n" in mount.log
    status = encidfs("status", "--mount", str(mount.path))
    assert f"note: {note}\n" in status.stdout, status.stdout
    assert not (mount.path / "encids.tdx.stat").exists()


def test_tdx_ids_are_limited_and_the_refusals_counted(mount_encidfs, procs):
    """encids.tdx.max refuses `encidfs alloc --type tdx`, then misc.max's tdx row does, each
    counting the refusal in its own events file."""
    mnt = mount_encidfs("--capacity", "tdx=31")
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    a = mnt / "a"
    a.mkdir()
    holder = procs.sleep()
    write(a / "cgroup.procs", str(holder.pid))
    write(a / "encids.tdx.max", "2")
    write(a / "misc.max", "tdx 3")

    def alloc(count: int) -> subprocess.CompletedProcess:
        return encidfs("alloc", "--mount", str(mnt), "--type", "tdx", "--count", str(count),
                       "--pid", str(holder.pid))

    result = alloc(2)
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n2\n", "")
    result = alloc(1)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "encidfs: tdx: EBUSY: refused by the encids limit of /a\n")
    assert read(a / "encids.tdx.events") == "max 1\n"
    write(a / "encids.tdx.max", "max")
    assert alloc(1).stdout == "3\n"
    result = alloc(1)
    assert (result.returncode, result.stderr) == (
        1, "encidfs: tdx: EBUSY: refused by the misc limit of /a\n")
    assert read(a / "misc.events") == read(a / "misc.events.local") == "tdx.max 1\n"
    assert read(a / "encids.tdx.events") == "max 1\n"
    assert read(a / "encids.tdx.current") == "3\n"
    assert read(a / "misc.current") == read(mnt / "misc.current") == "tdx 3\n"
    assert read(a / "misc.peak") == "tdx 3\n"
    assert keyed(read(mnt / "encids.tdx.stat")) == {"total": 31, "used": 3}


def test_encidfs_run_holds_tdx_ids_while_the_command_runs(mount_encidfs, procs):
    mnt = mount_encidfs("--capacity", "tdx=31")
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "vm").mkdir()
    runner = procs.start([*ENCIDFS, "run", "--mount", str(mnt), "--cgroup", "/vm", "--type",
                          "tdx", "--count", "2", "--print-ids", "--", "sleep", "600"],
                         stderr=subprocess.PIPE, text=True)
    assert runner.stderr.readline() == "1 2\n"
    assert read(mnt / "vm/encids.tdx.current") == "2\n"
    runner.kill()
    wait_until(lambda: read(mnt / "vm/encids.tdx.current") == "0\n",
               "the killed command's tdx IDs to be freed")


def test_metrics_and_top_show_tdx(mount_encidfs, procs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mnt = mount_encidfs("--capacity", "tdx=31", "--metrics", f"127.0.0.1:{port}")
    holder = procs.sleep()
    assert encidfs("alloc", "--mount", str(mnt), "--type", "tdx", "--pid",
                   str(holder.pid)).stdout == "1\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as reply:
        metrics = reply.read().decode().splitlines()
    assert 'encidfs_capacity{type="tdx"} 31.0' in metrics
    assert 'encidfs_used{type="tdx"} 1.0' in metrics
    assert 'encidfs_cgroup_current{cgroup="/",controller="misc",type="tdx"} 1.0' in metrics
    top = encidfs("top", "--mount", str(mnt), "-n", "1")
    assert top.stdout.splitlines()[0] == f"encidfs top: {mnt}   tdx 1/31"
    assert top.stdout.splitlines()[2].split()[:5] == ["/", "0", "1", "tdx", "[..........]"]
