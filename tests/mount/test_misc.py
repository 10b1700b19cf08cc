"""The misc controller's files on a mount, as kernel/cgroup/misc.c renders and parses them, and
its books beside encids's."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import DEADLINE, keyed, outcome, read, wait_until, write, write_result

from encidfs.client import Client, ControlError

MISC_ROOT = {"misc.capacity": 0o444, "misc.current": 0o444, "misc.peak": 0o444}
MISC_CHILD = {"misc.current": 0o444, "misc.peak": 0o444, "misc.max": 0o644,
              "misc.events": 0o444, "misc.events.local": 0o444}


def misc_modes(directory: Path) -> dict[str, int]:
    return {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in os.scandir(directory)
            if entry.name.startswith("misc.")}


def flat(path: Path) -> dict[str, int]:
    """A flat-keyed misc file: "TYPE N" (or "TYPE max") a line."""
    return {key: value if value == "max" else int(value)
            for key, value in (line.split(" ") for line in read(path).splitlines())}


def raw_request(mnt: Path, request: dict) -> dict:
    """One request on the mount's control socket, and its reply as the daemon wrote it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(os.getxattr(mnt, "user.encidfs.control").decode())
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as replies:
            return json.loads(replies.readline())


@pytest.fixture
def misc_cg(mnt):
    """/a, with misc (and encids) enabled by the root; a holder's allocations land there."""
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    (mnt / "a").mkdir()
    return mnt / "a"


def test_the_files_and_their_modes(mnt, misc_cg):
    assert read(mnt / "cgroup.controllers") == "encids misc\n"
    assert read(mnt / "cgroup.subtree_control") == "encids misc\n"
    assert misc_modes(mnt) == MISC_ROOT
    assert misc_modes(misc_cg) == MISC_CHILD
    (misc_cg / "b").mkdir()  # a does not enable misc for b
    assert misc_modes(misc_cg / "b") == {}
    assert outcome(lambda: os.stat(mnt / "misc.max")) == "ENOENT"


def test_the_formats(mount_encidfs):
    mnt = mount_encidfs("--capacity", "sev=5", "--capacity", "sev_es=0", "--capacity", "tdx=2")
    write(mnt / "cgroup.subtree_control", "+misc")
    (mnt / "a").mkdir()
    a = mnt / "a"
    # Types without capacity are left out (they have no usage, peak or events either).
    assert read(mnt / "misc.capacity") == "sev 5\ntdx 2\n"
    assert read(mnt / "misc.current") == "sev 0\ntdx 0\n"
    assert read(mnt / "misc.peak") == "sev 0\ntdx 0\n"
    assert read(a / "misc.max") == "sev max\ntdx max\n"
    assert read(a / "misc.events") == read(a / "misc.events.local") == "sev.max 0\ntdx.max 0\n"
    write(a / "misc.max", "tdx 1")
    assert read(a / "misc.max") == "sev max\ntdx 1\n"


@pytest.mark.parametrize("text, result, sev", [
    ("sev 5", "OK", 5),
    ("sev 5\n", "OK", 5),
    ("  sev 7  \n", "OK", 7),  # strstrip() first
    ("sev max", "OK", "max"),
    ("sev 0x10", "OK", 16),
    ("sev 010", "OK", 8),
    ("sev +3", "OK", 3),
    ("sev 18446744073709551615", "OK", "max"),  # U64_MAX is "max", as MAX_NUM
    ("sev 18446744073709551616", "ERANGE", "max"),
    ("sev  5", "EINVAL", "max"),  # split once at the first space: " 5" is no number
    ("sev 5 6", "EINVAL", "max"),
    ("sev\t5", "EINVAL", "max"),
    ("sev", "EINVAL", "max"),
    ("sev ", "EINVAL", "max"),
    ("sev -1", "EINVAL", "max"),
    ("sev MAX", "EINVAL", "max"),
    ("bogus 5", "EINVAL", "max"),
    ("SEV 5", "EINVAL", "max"),
    ("5", "EINVAL", "max"),
    ("", "OK", "max"),  # an empty write does nothing
    ("sev 5\nsev_es 3", "EINVAL", "max"),  # one line sets one type
])
def test_misc_max_parses_as_misc_cg_max_write(misc_cg, text, result, sev):
    assert write_result(misc_cg / "misc.max", text) == result
    assert flat(misc_cg / "misc.max") == {"sev": sev, "sev_es": "max"}


def test_a_type_without_capacity_takes_no_limit(mount_encidfs):
    mnt = mount_encidfs("--capacity", "sev=5", "--capacity", "tdx=0")
    write(mnt / "cgroup.subtree_control", "+misc")
    (mnt / "a").mkdir()
    assert write_result(mnt / "a/misc.max", "tdx 1") == "EINVAL"
    assert write_result(mnt / "a/misc.max", "tdx 99999999999999999999") == "ERANGE"  # parsed first


def test_encids_and_misc_agree_and_each_refuses_alone(mnt, misc_cg, procs):
    holder = procs.sleep()
    write(misc_cg / "cgroup.procs", str(holder.pid))
    with Client.connect(mount=str(mnt)) as client:
        client.allocate("sev", 2, pid=holder.pid)
        client.allocate("sev_es", 1, pid=holder.pid)
        assert flat(misc_cg / "misc.current") == {"sev": 2, "sev_es": 1}
        assert read(misc_cg / "encids.sev.current") == "2\n"
        assert read(misc_cg / "encids.sev_es.current") == "1\n"
        assert flat(mnt / "misc.current") == {"sev": 2, "sev_es": 1}
        assert read(mnt / "encids.sev.stat") == "total 509\nused 2\n"

        write(misc_cg / "misc.max", "sev 2")
        with pytest.raises(ControlError) as refused:
            client.allocate("sev", pid=holder.pid)
        assert (refused.value.errno, refused.value.cgroup) == (errno.EBUSY, "/a")
        assert refused.value.controller == "misc" and "misc limit" in refused.value.strerror
        assert flat(misc_cg / "misc.events") == {"sev.max": 1, "sev_es.max": 0}
        assert read(misc_cg / "encids.sev.events") == "max 0\n"  # encids counted nothing
        assert read(misc_cg / "encids.sev.current") == "2\n"

        write(misc_cg / "misc.max", "sev max")
        write(misc_cg / "encids.sev.max", "2")
        with pytest.raises(ControlError) as refused:
            client.allocate("sev", pid=holder.pid)
        assert "encids limit" in refused.value.strerror
        assert read(misc_cg / "encids.sev.events") == "max 1\n"
        assert flat(misc_cg / "misc.events") == {"sev.max": 1, "sev_es.max": 0}
        assert flat(misc_cg / "misc.current") == {"sev": 2, "sev_es": 1}
    holder.kill()
    wait_until(lambda: flat(mnt / "misc.current") == {"sev": 0, "sev_es": 0}, "the IDs to go")
    assert read(misc_cg / "encids.sev.current") == "0\n"
    assert flat(misc_cg / "misc.peak") == {"sev": 2, "sev_es": 1}  # the watermark stays


def test_the_socket_names_the_refusing_controller(mnt, misc_cg):
    write(misc_cg / "misc.max", "sev 0")
    pid = os.getpid()
    write(misc_cg / "cgroup.procs", str(pid))
    try:
        reply = raw_request(mnt, {"op": "allocate", "type": "sev"})
    finally:
        write(mnt / "cgroup.procs", str(pid))
    assert (reply["errno"], reply["cgroup"], reply["controller"]) == ("EBUSY", "/a", "misc")


def test_a_refused_charge_raises_the_peak_below_the_refusing_level(mnt, misc_cg, procs):
    write(misc_cg / "cgroup.subtree_control", "+misc")
    (misc_cg / "b").mkdir()
    write(misc_cg / "misc.max", "sev 2")
    holder = procs.sleep()
    write(misc_cg / "b/cgroup.procs", str(holder.pid))
    with Client.connect(mount=str(mnt)) as client:
        client.allocate("sev", 1, pid=holder.pid)
        with pytest.raises(ControlError):
            client.allocate("sev", 2, pid=holder.pid)  # b would hold 3: passes; a refuses
    assert flat(misc_cg / "b/misc.peak")["sev"] == 3
    assert flat(misc_cg / "misc.peak")["sev"] == 1
    assert flat(misc_cg / "misc.events.local")["sev.max"] == 1
    assert flat(misc_cg / "b/misc.events.local")["sev.max"] == 0
    assert flat(misc_cg / "b/misc.events")["sev.max"] == 0


@pytest.mark.parametrize("name", ["misc.events", "misc.events.local"])
def test_a_refusal_wakes_pollers_of_the_files_it_changed(mnt, misc_cg, name):
    write(misc_cg / "misc.max", "sev 0")
    fds = {n: os.open(misc_cg / n, os.O_RDONLY) for n in (name, "encids.sev.events")}
    try:
        for fd in fds.values():
            os.read(fd, 4096)  # kernfs: poll reports changes since the last read
        poller = select.poll()
        poller.register(fds[name], select.POLLPRI)
        pid = os.getpid()
        write(misc_cg / "cgroup.procs", str(pid))
        try:
            raw_request(mnt, {"op": "allocate", "type": "sev"})
        finally:
            write(mnt / "cgroup.procs", str(pid))
        assert poller.poll(5000) == [(fds[name], select.POLLPRI | select.POLLERR)]
        other = select.poll()
        other.register(fds["encids.sev.events"], select.POLLPRI)
        assert other.poll(0) == []  # encids refused nothing: its file did not change
    finally:
        for fd in fds.values():
            os.close(fd)


def test_the_containerd_managers_calls_work_with_misc(mnt):
    """The calls of containerd's cgroup2 Manager (cgroups v3): NewManager (MkdirAll, then
    ToggleControllers from the mount down to the parent, then the resources written with
    os.WriteFile), Controllers, reading stats, Delete (cgroup.type, a walk for cgroup.procs,
    rmdir); once with misc, once with encids."""
    for controller, limit_file, value in (("misc", "misc.max", "sev 3"),
                                          ("encids", "encids.sev.max", "3")):
        group = mnt / "kubepods" / f"pod-{controller}"
        os.makedirs(group, mode=0o755)  # MkdirAll
        for ancestor in (mnt, mnt / "kubepods"):  # ToggleControllers(Enable)
            fd = os.open(ancestor / "cgroup.subtree_control", os.O_WRONLY)
            try:
                os.write(fd, f"+{controller}".encode())
            finally:
                os.close(fd)
        fd = os.open(group / limit_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:  # os.WriteFile
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        assert controller in read(group / "cgroup.controllers").split()
        stats = {name: read(group / name) for name in os.listdir(group)
                 if name.startswith(f"{controller}.")}
        assert stats[limit_file].startswith("sev 3" if controller == "misc" else "3")
        assert keyed(read(group / "cgroup.events"))["populated"] == 0
        assert read(group / "cgroup.type") == "domain\n"
        procs = [int(pid) for path, _, files in os.walk(group) if "cgroup.procs" in files
                 for pid in read(Path(path) / "cgroup.procs").split()]
        assert procs == []
        os.rmdir(group)
        assert not group.exists()


@pytest.mark.parametrize("offered", ["misc", "misc,encids", "encids"])
def test_the_controllers_offered_are_chosen_at_mount(mount_encidfs, offered):
    mnt = mount_encidfs("--controllers", offered)
    names = offered.split(",")
    assert read(mnt / "cgroup.controllers") == " ".join(names) + "\n"
    files = os.listdir(mnt)
    assert ("misc.capacity" in files) == ("misc" in names)
    assert ("encids.sev.stat" in files) == ("encids" in names)
    assert outcome(lambda: write(mnt / "cgroup.subtree_control",
                                 "+encids" if "encids" not in names else "+misc"
                                 if "misc" not in names else "+bogus")) == "EINVAL"


def test_the_controllers_key_of_the_configuration_file(mount_encidfs, tmp_path):
    config = tmp_path / "encidfs.toml"
    config.write_text('controllers = ["misc"]\n')
    mnt = mount_encidfs("--config", str(config))
    assert read(mnt / "cgroup.controllers") == "misc\n"


@pytest.mark.parametrize("bad", ["bogus", "misc,misc", ""])
def test_unknown_or_repeated_controllers_are_refused_in_one_line(tmp_path, bad):
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, "-m", "encidfs", "mount", str(tmp_path / "mnt"),
                             "--controllers", bad], capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 1
    assert result.stderr.startswith("encidfs: controllers must be some of encids, misc")
    assert result.stderr.count("\n") == 1
