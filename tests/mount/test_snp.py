"""Guests through a real mount: an allocation names the guest it is for (the control
socket's "guest", `--guest` of `encidfs run` and `encidfs alloc`, the client's allocate()); an
SNP guest's IDs are charged to sev_es and taken from the SNP range, which shares SEV-ES's
unless ciphertext hiding splits it; `encidfs status` gives the ranges as KVM logs them."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from mountutil import DEADLINE, keyed, read, wait_until, write

from encidfs.client import Client, ControlError

ENCIDFS = [sys.executable, "-m", "encidfs"]
# KVM's layout on a host with ASIDs 1..20 and min_sev_asid 11: SEV 11..20, SEV-ES 1..10.
ASIDS = ("--asids", "20", "--min-sev-asid", "11")


def encidfs(*args):
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, timeout=DEADLINE,
                          stdin=subprocess.DEVNULL)


def refused(action) -> ControlError:
    with pytest.raises(ControlError) as info:
        action()
    return info.value


def misc(path, name):
    """A misc file's `TYPE N` lines, as a dict (a type at 0 is not listed)."""
    return keyed(read(path / name))


@pytest.fixture
def vm(procs):
    """A sleeping process to hold IDs, in /vm of the mount given."""
    def place(mnt):
        write(mnt / "cgroup.subtree_control", "+encids +misc")
        (mnt / "vm").mkdir()
        holder = procs.sleep()
        write(mnt / "vm/cgroup.procs", str(holder.pid))
        return holder
    return place


def test_snp_guests_share_sev_es_ids_and_are_charged_to_sev_es(mount_encidfs, vm):
    mnt = mount_encidfs(*ASIDS)
    holder = vm(mnt)
    with Client.connect(mount=mnt) as client:
        snp = client.allocate("sev_es", 2, pid=holder.pid, guest="snp")
        assert (snp, snp.type, snp.guest) == ([1, 2], "sev_es", "snp")
        es = client.allocate("sev_es", pid=holder.pid)
        assert (es, es.guest) == ([3], "sev_es")  # the type's own guest by default
        assert client.allocate("sev", pid=holder.pid, guest="sev") == [11]
        client.free([1], pid=holder.pid)
        assert client.allocate("sev_es", pid=holder.pid) == [1]  # one range for both
        holders = client.status()["holders"]
    assert misc(mnt / "vm", "misc.current") == {"sev": 1, "sev_es": 3}
    assert read(mnt / "vm/encids.sev_es.current") == "3\n"
    assert sorted((h["type"], h["guest"], h["ids"]) for h in holders) == [
        ("sev", "sev", [11]), ("sev_es", "sev_es", [1, 3]), ("sev_es", "snp", [2])]


@pytest.mark.parametrize("type_name, guest", [("sev", "snp"), ("sev_es", "sev"),
                                              ("sev", "tdx"), ("sev_es", 5)])
def test_a_guest_that_does_not_fit_the_type_is_einval(mount_encidfs, vm, type_name, guest):
    mnt = mount_encidfs(*ASIDS)
    holder = vm(mnt)
    with Client.connect(mount=mnt) as client:
        error = refused(lambda: client.request(op="allocate", type=type_name, guest=guest,
                                               pid=holder.pid))
        assert error.errno == errno.EINVAL
        assert client.status()["holders"] == []
    assert misc(mnt / "vm", "misc.current") == {"sev": 0, "sev_es": 0}


def test_status_gives_the_ranges_as_kvm_logs_them(mount_encidfs):
    mnt = mount_encidfs(*ASIDS)
    status = encidfs("status", "--mount", str(mnt))
    assert status.returncode == 0, status.stderr
    assert "SEV enabled (ASIDs 11 - 20)\nSEV-ES enabled (ASIDs 1 - 10)\n" \
           "SEV-SNP enabled (ASIDs 1 - 10)\n" in status.stdout, status.stdout


def test_encidfs_alloc_and_run_take_a_guest(mount_encidfs, vm, procs):
    mnt = mount_encidfs(*ASIDS)
    holder = vm(mnt)
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev_es", "--guest", "snp",
                     "--count", "2", "--pid", str(holder.pid))
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n2\n", "")
    runner = procs.start([*ENCIDFS, "run", "--mount", str(mnt), "--cgroup", "/vm", "--type",
                          "sev_es", "--guest", "snp", "--print-ids", "--", "sleep", "100"],
                         stderr=subprocess.PIPE, text=True)
    assert runner.stderr.readline() == "3\n"
    wait_until(lambda: misc(mnt / "vm", "misc.current") == {"sev": 0, "sev_es": 3},
               "vm's misc.current to be sev_es 3")
    status = encidfs("status", "--mount", str(mnt))
    assert f"pid {runner.pid:<8} sev_es (snp) /vm" in status.stdout, status.stdout
    result = encidfs("run", "--mount", str(mnt), "--type", "sev", "--guest", "snp", "--",
                     "echo", "must not run")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "encidfs: sev: EINVAL: Invalid argument: snp guests do not take " \
                            "sev IDs\n"
