"""Containers under `encidfs exec`: crun takes the mount for cgroup2, makes the container's
cgroup in it, writes the OCI spec's `linux.resources.unified` keys there (encids.sev.max) and
puts the container's processes in it.  A detached container outlives the exec that started it
and is deleted by a later one.  As root, and as a user in the user namespace exec makes (the
user's crun is rootless there, in a cgroup delegated to the user).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from mountutil import DEADLINE, REPO, SITE, User, keyed, pids, read, user_python, wait_until, write

from encidfs.exec import seccomp
from encidfs.exec.cgroup_bpf import PROG_QUERY, bpf_number

CRUN = shutil.which("crun")
RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")  # busybox-static's: the container's whole root file system

pytestmark = [
    pytest.mark.skipif(not seccomp.supported(), reason="seccomp user notification is used on "
                       "x86_64 and aarch64 only"),
    pytest.mark.skipif(CRUN is None or BUSYBOX is None, reason="crun and busybox-static"),
]
BPF_CGROUP_DEVICE = 6


def _root_may_raise_memlock() -> bool:
    """crun (as root) raises RLIMIT_MEMLOCK to unlimited before it loads its device filter, and
    stops where it may not: a root without CAP_SYS_RESOURCE, as in some containers."""
    raise_it = ("import resource; "
                "resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)")
    return subprocess.run([sys.executable, "-c", raise_it]).returncode == 0


@dataclass
class Crun:
    """crun, run under `encidfs exec` on the mount by root or by a user."""

    mnt: Path
    state: Path  # crun's --root
    bundle: Path
    user: User | None
    shell_cgroup: Path | None  # where the user's commands start (inside the delegated cgroup)

    def start(self, *args: str, **popen) -> subprocess.Popen:
        argv = [sys.executable, "-m", "encidfs", "exec", "--mount", str(self.mnt), "--",
                CRUN, "--root", str(self.state), *args]
        if self.user is not None:  # the user's python, and a start in the delegated cgroup
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"',
                    str(self.shell_cgroup / "cgroup.procs"), *self.user.setpriv(), "env", "-i",
                    "PATH=/usr/local/bin:/usr/bin:/bin", f"PYTHONPATH={REPO}:{SITE}",
                    user_python(), *argv[1:]]
        return subprocess.Popen(argv, cwd=self.bundle, text=True, **popen)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """crun ARGS to its end.  Its errors go to a file: a detached container keeps crun's
        standard streams, and a pipe would not end with crun."""
        with tempfile.TemporaryFile("w+") as errors:
            started = self.start(*args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=errors)
            started.wait(timeout=DEADLINE)
            errors.seek(0)
            return subprocess.CompletedProcess(started.args, started.returncode, None,
                                               errors.read())


def make_bundle(bundle: Path, cgroup: str, user: User | None, runtime: str = CRUN,
                script: str = "echo ready; exec sleep 1000") -> dict:
    """An OCI bundle of busybox whose container runs `script` (says "ready", then sleeps), in
    `cgroup` (from the mount's root) with encids.sev.max 1; its spec."""
    binaries = bundle / "rootfs" / "bin"
    binaries.mkdir(parents=True)
    shutil.copy(BUSYBOX, binaries / "busybox")
    for applet in ("sh", "sleep"):
        (binaries / applet).symlink_to("busybox")
    subprocess.run([runtime, "spec", *(["--rootless"] if user else [])], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=["sh", "-c", script])
    spec["linux"]["cgroupsPath"] = cgroup
    spec["linux"].setdefault("resources", {})["unified"] = {"encids.sev.max": "1"}
    if user is not None:  # the container's root is the user, as exec's namespace maps it
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": user.uid, "size": 1}]
        spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": user.gid, "size": 1}]
    (bundle / "config.json").write_text(json.dumps(spec))
    return spec


@pytest.fixture(params=["root", "user"])
def crun(request, mnt, tmp_path, traversable) -> Crun:
    """crun on a fresh mount whose /tenant has encids enabled (crun enables only controllers
    it knows; a container's parent cgroup is set up by whoever delegates it)."""
    write(mnt / "cgroup.subtree_control", "+encids")
    tenant = mnt / "tenant"
    tenant.mkdir()
    write(tenant / "cgroup.subtree_control", "+encids")
    user, shell = None, None
    if request.param == "root":
        if not _root_may_raise_memlock():
            pytest.skip("crun as root raises RLIMIT_MEMLOCK, which needs CAP_SYS_RESOURCE")
    else:
        user = request.getfixturevalue("user")
        shell = tenant / "shell"
        shell.mkdir()
        for path in (tenant, *(tenant / name for name in
                               ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"))):
            os.chown(path, user.uid, user.gid)
        traversable(mnt)
    bundle, state = tmp_path / "bundle", tmp_path / "state"
    make_bundle(bundle, "/tenant/c1", user)
    state.mkdir()
    if user is not None:
        for path in (tmp_path, state, bundle, *bundle.rglob("*")):
            os.lchown(path, user.uid, user.gid)
        traversable(bundle)
    runtime = Crun(mnt, state, bundle, user, shell)
    yield runtime
    for leftover in state.iterdir():  # a container a failed test left
        runtime.run("delete", "--force", leftover.name)


def allocate(mnt: Path, pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encidfs", "alloc", "--mount", str(mnt),
                           "--type", "sev", "--pid", str(pid)],
                          capture_output=True, text=True, timeout=DEADLINE)


def check_the_container(mnt: Path, path: str = "/tenant/c1") -> int:
    """The container's process is the only member of the cgroup the runtime made, whose
    limit from the spec refuses a second ID; its PID."""
    cgroup = mnt / path.lstrip("/")
    member, = wait_until(lambda: pids(cgroup), "the container in /tenant/c1")
    assert read(cgroup / "encids.sev.max") == "1\n"
    assert allocate(mnt, member).returncode == 0
    refused = allocate(mnt, member)
    assert refused.returncode != 0 and keyed(read(cgroup / "encids.sev.events"))["max"] == 1
    assert read(cgroup / "encids.sev.current") == "1\n"
    return member


def test_crun_runs_a_container_in_the_cgroup_it_made(crun):
    running = crun.start("run", "c1", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert running.stdout.readline() == "ready\n", running.stderr.read()
        member = check_the_container(crun.mnt)
        os.kill(member, signal.SIGKILL)
        assert running.wait(timeout=DEADLINE) == 128 + signal.SIGKILL  # the container's status
    finally:
        running.kill()
        running.wait()
    wait_until(lambda: not (crun.mnt / "tenant" / "c1").exists(), "crun to remove /tenant/c1")


def test_a_detached_container_outlives_exec_and_a_later_exec_deletes_it(crun):
    started = crun.run("run", "--detach", "c1")
    assert started.returncode == 0, started.stderr
    member = check_the_container(crun.mnt)
    deleted = crun.run("delete", "--force", "c1")
    assert deleted.returncode == 0, deleted.stderr
    wait_until(lambda: not os.path.exists(f"/proc/{member}"), "the container to end")
    assert not (crun.mnt / "tenant" / "c1").exists()


def device_programs(cgroup: Path) -> int:
    """How many BPF programs are attached to a kernel cgroup as its device filter."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        query = ctypes.create_string_buffer(struct.pack("=3IIQI", fd, BPF_CGROUP_DEVICE, 0, 0,
                                                        0, 0), 32)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(bpf_number(), PROG_QUERY, query, 32) == 0, ctypes.get_errno()
        return struct.unpack_from("=I", query, 24)[0]
    finally:
        os.close(fd)


@pytest.mark.skipif(RUNC is None, reason="runc")
def test_runc_on_a_mount_over_a_cgroup_filters_devices_in_the_kernels(scratch, encidfs_factory,
                                                                        tmp_path):
    """runc's device filter, a BPF program, is attached to the kernel's cgroup behind the
    mount's directory; the container may not open a device its spec does not allow."""
    mnt = encidfs_factory(options=("--over", str(scratch))).path
    write(mnt / "cgroup.subtree_control", "+encids")
    bundle = tmp_path / "bundle"
    spec = make_bundle(bundle, "/c1", None, RUNC,
                       "if (exec 3>/mnt/kmsg) 2>/dev/null; then echo kmsg allowed; "
                       "else echo kmsg denied; fi; echo ready; exec sleep 1000")
    spec["mounts"].append({"destination": "/mnt/kmsg", "type": "bind", "source": "/dev/kmsg",
                           "options": ["bind"]})  # a device the spec's rules do not allow
    (bundle / "config.json").write_text(json.dumps(spec))
    running = subprocess.Popen(
        [sys.executable, "-m", "encidfs", "exec", "--mount", str(mnt), "--", RUNC, "--root",
         str(tmp_path / "state"), "run", "c1"], cwd=bundle, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert running.stdout.readline() == "kmsg denied\n", running.stderr.read()
        assert running.stdout.readline() == "ready\n"
        assert device_programs(scratch / "c1") >= 1
        member = check_the_container(mnt, "/c1")
        assert pids(scratch / "c1") == [member]  # the kernel's own membership
        os.kill(member, signal.SIGKILL)
        assert running.wait(timeout=DEADLINE) == 128 + signal.SIGKILL
    finally:
        running.kill()
        running.wait()
    wait_until(lambda: not (scratch / "c1").exists(), "runc to remove the cgroup")


# A device-filter query on /sys/fs/cgroup, as runc makes it, with room for argv[2] program IDs
# (in a buffer of 64): "0 N" (programs attached) or the errno's name.
QUERY = ("import ctypes, errno, os, struct, sys\n"
         "fd = os.open('/sys/fs/cgroup', os.O_RDONLY | os.O_DIRECTORY)\n"
         "ids = ctypes.create_string_buffer(256)\n"
         "query = ctypes.create_string_buffer(struct.pack('=3IIQI', fd, 6, 0, 0, "
         "ctypes.addressof(ids), int(sys.argv[2])), 32)\n"
         "libc = ctypes.CDLL(None, use_errno=True)\n"
         "result = libc.syscall(int(sys.argv[1]), 16, query, 32)\n"
         "print(result, struct.unpack_from('=I', query, 24)[0] if result == 0 else "
         "errno.errorcode[ctypes.get_errno()])\n")


def test_only_a_caller_that_could_query_the_kernels_cgroup_is_answered(scratch, encidfs_factory,
                                                                       user):
    """The call is made with exec's credentials: a caller without CAP_BPF and CAP_NET_ADMIN
    gets the kernel's own answer, as on the kernel's cgroup."""
    mnt = encidfs_factory(options=("--over", str(scratch))).path
    as_root = subprocess.run([sys.executable, "-m", "encidfs", "exec", "--mount", str(mnt), "--",
                              sys.executable, "-c", QUERY, str(bpf_number()), str(2**32 - 1)],
                             capture_output=True, text=True, timeout=DEADLINE)
    assert as_root.stdout == "0 0\n", as_root.stderr  # a room of 2^32 IDs costs exec nothing
    as_user = subprocess.run([sys.executable, "-m", "encidfs", "exec", "--mount", str(mnt), "--",
                              *user.setpriv(), "--inh-caps=-all", "--bounding-set=-all",
                              user_python(), "-c", QUERY, str(bpf_number()), "64"],
                             capture_output=True, text=True, timeout=DEADLINE)
    assert as_user.stdout.split()[0] == "-1", as_user.stderr
    assert as_user.stdout.split()[1] in ("EPERM", "EBADF")  # by kernel.unprivileged_bpf_disabled
