"""`encidfs exec`: unmodified cgroup tools see the mount as the cgroup2 file system.

statfs(2) and fstatfs(2) on the mount answer CGROUP2_SUPER_MAGIC (seccomp user notification,
answered by `encidfs exec`); elsewhere they answer the truth.  systemd's own tools, which refuse
any /sys/fs/cgroup that is not cgroup2, list the tree.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
from mountutil import DEADLINE, REPO, SITE, user_python, wait_until, write

from encidfs.exec import seccomp

ENCIDFS = [sys.executable, "-m", "encidfs"]

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason="seccomp user notification "
                                "is used on x86_64 and aarch64 only")


# fstatfs(2) of each file named, f_type in hex (coreutils' stat has no fstatfs).
FSTATFS = ("import ctypes, os, struct, sys\n"
           "for path in sys.argv[1:]:\n"
           "    answer = ctypes.create_string_buffer(120)\n"
           "    ctypes.CDLL(None).fstatfs(os.open(path, os.O_RDONLY), answer)\n"
           "    print(hex(struct.unpack_from(\"q\", answer)[0]))\n")


def run_in(mnt, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    """argv under `encidfs exec` on mnt; exec's own options first if argv has a "--"."""
    options, argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else ((), argv)
    return subprocess.run([*ENCIDFS, "exec", "--mount", str(mnt), *options, "--", *argv],
                          capture_output=True, text=True, timeout=DEADLINE, **kwargs)


def test_statfs_answers_cgroup2_on_the_mount_and_the_truth_elsewhere(mnt, tmp_path):
    done = run_in(mnt, "sh", "-c",
                  "stat -f -c %T /sys/fs/cgroup /sys/fs/cgroup/cgroup.procs / && "
                  "cd /sys/fs/cgroup && stat -f -c %T . && "
                  f"{sys.executable} -c '{FSTATFS}' /sys/fs/cgroup/cgroup.procs /")
    assert done.returncode == 0, done.stderr
    truth = subprocess.run(["stat", "-f", "-c", "%T", "/"], capture_output=True,
                           text=True).stdout.strip()
    root_type = subprocess.run([sys.executable, "-c", FSTATFS, "/"], capture_output=True,
                               text=True).stdout.strip()
    assert done.stdout.split() == ["cgroup2fs", "cgroup2fs", truth, "cgroup2fs",
                                   hex(seccomp.CGROUP2_SUPER_MAGIC), root_type]
    # Not intercepted: errors are the kernel's own.
    missing = run_in(mnt, "stat", "-f", "/sys/fs/cgroup/nothing-here")
    assert missing.returncode == 1 and "No such file or directory" in missing.stderr


# Calls a supervisor must not trip on: bad pointers, and many threads asking at once.
HOSTILE = (
    "import ctypes, os, threading\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "answer = ctypes.create_string_buffer(120)\n"
    "def errno_of(result):\n"
    "    return 0 if result == 0 else ctypes.get_errno()\n"
    "print(errno_of(libc.statfs(None, answer)))\n"  # no path
    "print(errno_of(libc.statfs(b'/sys/fs/cgroup', None)))\n"  # no answer buffer
    "print(errno_of(libc.statfs(b'/sys/fs/cgroup/' + b'x' * 5000, answer)))\n"  # too long
    "print(errno_of(libc.fstatfs(9999, answer)))\n"  # no such descriptor
    "def ask():\n"
    "    for _ in range(200):\n"
    "        mine = ctypes.create_string_buffer(120)\n"
    "        assert libc.statfs(b'/sys/fs/cgroup', mine) == 0\n"
    "        assert mine.raw[:4] == (0x63677270).to_bytes(4, 'little')\n"
    "threads = [threading.Thread(target=ask) for _ in range(8)]\n"
    "[t.start() for t in threads]\n"
    "[t.join() for t in threads]\n"
    "print('asked')\n")


def test_bad_calls_get_the_kernels_errors_and_the_supervisor_goes_on(mnt):
    done = run_in(mnt, sys.executable, "-c", HOSTILE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.EFAULT), str(errno.EFAULT),
                                   str(errno.ENAMETOOLONG), str(errno.EBADF), "asked"]


def test_the_command_gets_no_listener_and_its_own_status(mnt):
    done = run_in(mnt, "sh", "-c", "ls -l /proc/self/fd/; exit 7")
    assert done.returncode == 7
    assert "seccomp" not in done.stdout and "socket" not in done.stdout, done.stdout
    assert run_in(mnt, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM


def test_a_signal_to_exec_reaches_the_command(mnt, procs):
    runner = procs.start([*ENCIDFS, "exec", "--mount", str(mnt), "--", "sh", "-c",
                          "trap 'exit 42' TERM; echo ready; while :; do sleep 0.01; done"],
                         stdout=subprocess.PIPE, text=True)
    assert runner.stdout.readline() == "ready\n"
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=DEADLINE) == 42


def exec_supervisors(mnt) -> list[int]:
    """The `encidfs exec` processes of the mount."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv[1:6] == [b"-m", b"encidfs", b"exec", b"--mount", os.fsencode(mnt)]:
            found.append(int(entry))
    return found


def test_what_the_command_leaves_running_is_answered_until_it_ends(mnt, tmp_path):
    """exec returns with the command; what it started in the background (a detached
    container) is answered by a process of exec's own, which ends with the last of them."""
    assert run_in(mnt, "true").returncode == 0
    assert exec_supervisors(mnt) == []  # nothing left: nothing stays to answer
    go, said = tmp_path / "go", tmp_path / "said"
    os.mkfifo(go)
    done = run_in(mnt, "sh", "-c", f'(read line < {go}; stat -f -c %T /sys/fs/cgroup > {said}) '
                                   "> /dev/null 2>&1 &")
    assert done.returncode == 0
    assert len(exec_supervisors(mnt)) == 1
    with open(go, "w") as f:
        f.write("go\n")
    wait_until(lambda: said.exists() and said.read_text() == "cgroup2fs\n",
               "the background command's statfs")
    wait_until(lambda: not exec_supervisors(mnt), "exec's answering process to end")


@pytest.mark.skipif(shutil.which("systemd-cgls") is None, reason="systemd's tools are needed")
def test_systemd_cgls_and_cgtop_list_the_tree(mnt, procs):
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "tenant").mkdir()
    member = procs.sleep()
    write(mnt / "tenant" / "cgroup.procs", str(member.pid))
    listed = run_in(mnt, "systemd-cgls", "--no-pager", "/tenant")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == "Control group /tenant:"
    assert f"{member.pid} sleep" in listed.stdout
    top = run_in(mnt, "systemd-cgtop", "-b", "-n", "1")
    assert top.returncode == 0, top.stderr
    assert any(line.split()[:2] == ["/tenant", "1"] for line in top.stdout.splitlines())


def test_a_user_gets_it_in_the_user_namespace(mnt, user, traversable):
    """As a user, exec makes a user namespace; the filter needs no privilege there."""
    traversable(mnt)
    done = subprocess.run(
        [*user.setpriv(), "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
         f"PYTHONPATH={REPO}:{SITE}", user_python(), "-m", "encidfs", "exec", "--mount",
         str(mnt), "--", "sh", "-c", "id -u; stat -f -c %T /sys/fs/cgroup"],
        capture_output=True, text=True, timeout=DEADLINE, cwd="/")
    if done.returncode == 1 and "user namespaces" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(user.uid), "cgroup2fs"]


def test_with_mounts_the_mount_tables_say_cgroup2(mnt):
    done = run_in(mnt, "--mounts", "--", "sh", "-c",
                  "grep ' /sys/fs/cgroup ' /proc/self/mounts /etc/mtab; "
                  "cd /proc && grep ' /sys/fs/cgroup ' self/mountinfo thread-self/mounts; "
                  "grep -c ' /sys/fs/cgroup/' /proc/self/mounts; cat /etc/hostname")
    with open("/etc/hostname") as f:
        hostname = f.read()
    lines = done.stdout.splitlines()
    assert lines[0] == "/proc/self/mounts:cgroup2 /sys/fs/cgroup cgroup2 " \
                       "rw,nosuid,nodev,noexec,relatime 0 0"
    assert lines[1].startswith("/etc/mtab:cgroup2 /sys/fs/cgroup cgroup2 ")
    assert lines[2].startswith("self/mountinfo:") and lines[2].endswith(" - cgroup2 cgroup2 rw")
    assert lines[3].startswith("thread-self/mounts:cgroup2 /sys/fs/cgroup cgroup2 ")
    assert lines[4] == "0"  # what the mount hides (a hybrid host's v1 hierarchies) is gone
    assert "\n".join(lines[5:]) + "\n" == hostname  # other opens are the kernel's
    plain = run_in(mnt, "grep", " /sys/fs/cgroup ", "/proc/self/mounts")
    assert "fuse.encidfs" in plain.stdout  # only asked for


def test_with_proc_cgroup_proc_pid_cgroup_names_the_mounts_cgroup(mnt, procs):
    """Every name of the file, for the caller, another process and a thread, and PIDs named
    in a PID namespace of the command's own; what is not one of them is the kernel's."""
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    other = procs.sleep()
    write(mnt / "b" / "cgroup.procs", str(other.pid))
    script = ("cat /proc/self/cgroup; echo $$ > /sys/fs/cgroup/a/cgroup.procs; "
              "cat /proc/self/cgroup /proc/thread-self/cgroup /proc/$$/cgroup "
              f"/proc/$$/task/$$/cgroup /proc/{other.pid}/cgroup; cd /proc/self && cat cgroup; "
              "unshare --pid --fork --mount-proc sh -c 'cat /proc/1/cgroup /proc/self/cgroup'; "
              "cat /proc/self/cgroup/ /proc/2147483647/cgroup")
    done = run_in(mnt, "--proc-cgroup", "--", "sh", "-c", script)
    assert done.stdout.splitlines() == ["0::/", *["0::/a"] * 4, "0::/b", *["0::/a"] * 3]
    assert done.stderr.splitlines() == [
        "cat: /proc/self/cgroup/: Not a directory",
        "cat: /proc/2147483647/cgroup: No such file or directory"]
    plain = run_in(mnt, "cat", "/proc/self/cgroup")
    with open("/proc/self/cgroup") as f:
        assert plain.stdout == f.read()  # only asked for


@pytest.mark.skipif(shutil.which("cgget") is None, reason="libcgroup's tools (cgroup-tools)")
def test_libcgroup_reads_the_mount_with_mounts(mnt, mount_encidfs):
    """Another encidfs mount, mounted first, is not the one exec binds (nor cgroup2)."""
    other = mount_encidfs()
    write(other / "cgroup.subtree_control", "+encids")
    (other / "tenant").mkdir()
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "tenant").mkdir()
    write(mnt / "tenant" / "encids.sev.max", "3")
    done = run_in(mnt, "--mounts", "--", "cgget", "-g", "encids:/tenant")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == ["/tenant:", "encids.sev.max: 3",
                                            "encids.sev.current: 0"]
