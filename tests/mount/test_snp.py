"""Guests through a real mount: an allocation names the guest it is for (the control
socket's "guest", `--guest` of `encidfs run` and `encidfs alloc`, the client's allocate()); an
SNP guest's IDs are charged to sev_es and taken from the SNP range, which shares SEV-ES's
unless ciphertext hiding splits it; `encidfs status` gives the ranges as KVM logs them.  The
split comes from fake AMD hosts (ENCIDFS_HOST_ROOT) or from --snp-asids."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import DEADLINE, FSTYPE, keyed, mounted_fstype, read, wait_until, write

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
def amd_host_mount(tmp_path):
    """amd_host_mount(**kvm_amd) mounts encidfs (`encidfs mount`, as a host's admin does) on a
    fake AMD host: CPUID Fn8000_001F with ASIDs 1..20 and SEV from 11, kvm_amd with SEV and
    SEV-ES enabled and the parameters given (sev_snp, ciphertext_hiding_asids).  Unmounted
    afterwards."""
    mounted = []

    def mount(**kvm_amd: str) -> Path:
        host, mnt = tmp_path / f"host{len(mounted)}", tmp_path / f"mnt{len(mounted)}"
        parameters = host / "sys/module/kvm_amd/parameters"
        parameters.mkdir(parents=True)
        for name, value in {"sev": "Y", "sev_es": "Y", **kvm_amd}.items():
            (parameters / name).write_text(f"{value}\n")
        (host / "dev/cpu/0").mkdir(parents=True)
        with open(host / "dev/cpu/0/cpuid", "wb") as f:
            f.seek(0x8000001F)
            f.write(struct.pack("<4I", 0b1010, 0x33, 20, 11))  # SEV, SEV-ES; ECX, EDX
        mnt.mkdir()
        run = subprocess.run([*ENCIDFS, "mount", str(mnt)], capture_output=True, text=True,
                             timeout=DEADLINE, stdin=subprocess.DEVNULL,
                             env={**os.environ, "ENCIDFS_HOST_ROOT": str(host)})
        assert run.returncode == 0, run.stderr
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        if mounted_fstype(mnt) == FSTYPE:
            assert encidfs("umount", str(mnt)).returncode == 0


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


# -- fake AMD hosts --------------------------------------------------------------------------

def test_with_ciphertext_hiding_snp_guests_take_1_to_n_and_the_next_is_ebusy_unseen(
        amd_host_mount, vm, procs):
    """sev_snp=Y, ciphertext_hiding_asids=4: SNP guests 1..4, SEV-ES guests 5..10, all charged
    to sev_es (capacity 10).  The fifth SNP guest is EBUSY, counted in no events file (no
    limit refused: sev_asid_new() found its range full), though misc.peak saw the charge."""
    mnt = amd_host_mount(sev_snp="Y", ciphertext_hiding_asids="4")
    holder = vm(mnt)
    status = encidfs("status", "--mount", str(mnt)).stdout
    assert "SEV enabled (ASIDs 11 - 20)\nSEV-ES enabled (ASIDs 5 - 10)\n" \
           "SEV-SNP enabled (ASIDs 1 - 4)\n" in status, status
    assert read(mnt / "misc.capacity") == "sev 10\nsev_es 10\n"
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev_es", "--guest", "snp",
                     "--count", "2", "--pid", str(holder.pid))
    assert (result.returncode, result.stdout) == (0, "1\n2\n"), result.stderr
    runner = procs.start([*ENCIDFS, "run", "--mount", str(mnt), "--cgroup", "/vm", "--type",
                          "sev_es", "--guest", "snp", "--print-ids", "--", "sleep", "100"],
                         stderr=subprocess.PIPE, text=True)
    assert runner.stderr.readline() == "3\n"
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev_es", pid=holder.pid, guest="snp") == [4]
        full = refused(lambda: client.allocate("sev_es", pid=holder.pid, guest="snp"))
        assert (full.errno, full.cgroup, full.controller) == (errno.EBUSY, None, None)
        result = encidfs("run", "--mount", str(mnt), "--cgroup", "/vm", "--type", "sev_es",
                         "--guest", "snp", "--", "echo", "must not run")
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", "encidfs: sev_es: EBUSY: all 4 IDs of snp guests (1 - 4) are in use\n")
        vm_misc = mnt / "vm"
        wait_until(lambda: misc(vm_misc, "misc.current") == {"sev": 0, "sev_es": 4},
                   "vm's misc.current to be sev_es 4 once the refused runner is gone")
        assert misc(vm_misc, "misc.events") == {"sev.max": 0, "sev_es.max": 0}
        assert misc(vm_misc, "misc.events.local") == {"sev.max": 0, "sev_es.max": 0}
        assert read(vm_misc / "encids.sev_es.events") == "max 0\n"
        assert misc(vm_misc, "misc.peak") == {"sev": 0, "sev_es": 5}
        # SEV-ES guests take theirs above N, from the same sev_es books.
        assert client.allocate("sev_es", 6, pid=holder.pid) == [5, 6, 7, 8, 9, 10]
        wait_until(lambda: misc(vm_misc, "misc.current") == {"sev": 0, "sev_es": 10},
                   "vm's misc.current to be sev_es 10")
        runner.kill()
        wait_until(lambda: misc(vm_misc, "misc.current")["sev_es"] == 9,
                   "the killed runner's ID to be freed")
        assert client.allocate("sev_es", pid=holder.pid, guest="snp") == [3]


def test_with_snp_and_no_ciphertext_hiding_snp_and_sev_es_share_the_range(amd_host_mount, vm):
    mnt = amd_host_mount(sev_snp="Y", ciphertext_hiding_asids="0")
    holder = vm(mnt)
    status = encidfs("status", "--mount", str(mnt)).stdout
    assert "SEV-ES enabled (ASIDs 1 - 10)\nSEV-SNP enabled (ASIDs 1 - 10)\n" in status, status
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev_es", pid=holder.pid, guest="snp") == [1]
        assert client.allocate("sev_es", pid=holder.pid) == [2]
        assert client.allocate("sev_es", 8, pid=holder.pid, guest="snp") == list(range(3, 11))
        over = refused(lambda: client.allocate("sev_es", pid=holder.pid, guest="snp"))
        assert (over.errno, over.cgroup) == (errno.EBUSY, "/vm")  # sev_es's capacity refused
    assert misc(mnt / "vm", "misc.current") == {"sev": 0, "sev_es": 10}


def test_a_host_without_snp_refuses_snp_guests(amd_host_mount, vm):
    mnt = amd_host_mount(sev_snp="N", ciphertext_hiding_asids="4")
    holder = vm(mnt)
    assert "SEV-ES enabled (ASIDs 1 - 10)\nSEV-SNP disabled (ASIDs 1 - 10)\n" in encidfs(
        "status", "--mount", str(mnt)).stdout
    with Client.connect(mount=mnt) as client:
        error = refused(lambda: client.allocate("sev_es", pid=holder.pid, guest="snp"))
        assert error.errno == errno.EINVAL
        assert client.allocate("sev_es", pid=holder.pid) == [1]  # ASIDs 1..4 are SEV-ES's


def test_snp_asids_given_and_the_guests_ranges_come_back_from_the_journal(encidfs_factory,
                                                                           procs):
    mount = encidfs_factory(state=True, options=(*ASIDS, "--snp-asids", "2"))
    holder = procs.sleep()
    with mount.client() as client:
        assert client.allocate("sev_es", 2, pid=holder.pid, guest="snp") == [1, 2]
        assert client.allocate("sev_es", pid=holder.pid) == [3]
    mount.restart()
    with mount.client() as client:
        assert sorted((h["guest"], h["ids"]) for h in client.status()["holders"]) == [
            ("sev_es", [3]), ("snp", [1, 2])]
        assert refused(lambda: client.allocate("sev_es", pid=holder.pid,
                                               guest="snp")).errno == errno.EBUSY
        assert client.allocate("sev_es", pid=holder.pid) == [4]
