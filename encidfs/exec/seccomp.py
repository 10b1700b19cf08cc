"""statfs(2) and fstatfs(2) answered as cgroup2's, for files of an encidfs mount, under
`encidfs exec`: tools that ask the kernel what /sys/fs/cgroup is (systemd, crun, runc) take the
mount for the cgroup2 file system it looks like.

The command installs a seccomp filter just before its exec (`python -m encidfs.exec.seccomp SOCKET
-- CMD`): statfs and fstatfs go to a supervisor (SECCOMP_RET_USER_NOTIF), every other call runs
as it would.  The supervisor is `encidfs exec` itself, the command's parent, which receives the
filter's listener on SOCKET.  For a call on a file of the mount (by device number, read
through the caller's /proc/PID/root, cwd or fd) it makes the real call, sets f_type to
CGROUP2_SUPER_MAGIC and writes the answer into the caller's memory; any other call it lets run
(SECCOMP_USER_NOTIF_FLAG_CONTINUE), so that its answer is the kernel's.  Asked for, opens
are sent too, and an open of a mount table or of /proc/PID/cgroup is answered with a memfd of
the text the supervisor makes (SECCOMP_IOCTL_NOTIF_ADDFD).  A notification is
checked still valid (SECCOMP_IOCTL_NOTIF_ID_VALID) after the caller's memory was read and
before the answer is written.  No seccomp library fits: libseccomp's Python binding is not on
PyPI, and this takes one filter of six instructions and three ioctls.

If the supervisor died, the command's statfs calls would fail (ENOSYS); it answers whatever
comes, and a call it cannot answer runs as the kernel would.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import NamedTuple

from . import caller
from .cgroup_bpf import CgroupBpf, bpf_number

CGROUP2_SUPER_MAGIC = 0x63677270
_libc = ctypes.CDLL(None, use_errno=True)

class _Arch(NamedTuple):
    audit: int  # AUDIT_ARCH_*, as seccomp_data.arch has it
    statfs: int
    fstatfs: int
    seccomp: int
    open: int | None  # aarch64 has openat alone
    openat: int
    openat2: int


_ARCHES = {"x86_64": _Arch(0xC000003E, 137, 138, 317, 2, 257, 437),
           "aarch64": _Arch(0xC00000B7, 43, 44, 277, None, 56, 437)}
_SECCOMP_SET_MODE_FILTER = 1
_FLAG_NEW_LISTENER = 1 << 3
_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # Linux 5.19: a signal does not abandon a waiting call
_RET_ALLOW = 0x7FFF0000
_RET_USER_NOTIF = 0x7FC00000
_USER_NOTIF_FLAG_CONTINUE = 1
_PR_SET_NO_NEW_PRIVS = 38
_NOTIF = struct.Struct("=QII iI Q 6Q")  # struct seccomp_notif with its seccomp_data
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp
_IOCTL_RECV = 0xC0000000 | _NOTIF.size << 16 | 0x2100
_IOCTL_SEND = 0xC0000000 | _RESP.size << 16 | 0x2101
_IOCTL_ID_VALID = 0x40000000 | 8 << 16 | 0x2102
_ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd
_IOCTL_ADDFD = 0x40000000 | _ADDFD.size << 16 | 0x2103
_ADDFD_FLAG_SEND = 1 << 1  # Linux 5.14: the new descriptor is the call's answer
_AT_FDCWD = -100
# The files of /proc answered, "self" and "thread-self" being the caller.
_PROC_FILE = re.compile(r"/proc/(?:(self|thread-self|\d+)(?:/task/(\d+))?/)?"
                        r"(mounts|mountinfo|cgroup)")
_STATFS_SIZE = 120  # struct statfs on a 64-bit architecture; f_type is its first word


def supported() -> bool:
    return platform.machine() in _ARCHES


def _filter(opens: bool, bpf: bool) -> bytes:
    """The BPF program: statfs and fstatfs of this architecture notify (and with `opens`, the
    calls that open a file; with `bpf`, bpf(2)), all else is allowed."""
    arch = _ARCHES[platform.machine()]
    numbers = [number for number in (arch.open, arch.openat, arch.openat2) if number is not None]
    wanted = [arch.statfs, arch.fstatfs, *(numbers if opens else ()),
              *([bpf_number()] if bpf else ())]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|K
    program = [(ld, 0, 0, 4),  # seccomp_data.arch
               (jeq, 0, len(wanted) + 1, arch.audit),  # another architecture's: allowed
               (ld, 0, 0, 0)]  # seccomp_data.nr
    program += [(jeq, len(wanted) - index, 0, number) for index, number in enumerate(wanted)]
    program += [(ret, 0, 0, _RET_ALLOW), (ret, 0, 0, _RET_USER_NOTIF)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def install(opens: bool = False, bpf: bool = False) -> int:
    """Install the filter on this process; return its listener.  Without CAP_SYS_ADMIN the
    kernel wants no_new_privs first (set only then: a setuid program keeps working as root)."""
    code = _filter(opens, bpf)
    instructions = ctypes.create_string_buffer(code, len(code))
    program = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(instructions))
    prog = ctypes.create_string_buffer(program, len(program))
    number = _ARCHES[platform.machine()].seccomp
    for flags in (_FLAG_NEW_LISTENER | _FLAG_WAIT_KILLABLE_RECV, _FLAG_NEW_LISTENER):
        for attempt in range(2):
            fd = _libc.syscall(number, _SECCOMP_SET_MODE_FILTER, flags, prog)
            if fd >= 0:
                return fd
            error = ctypes.get_errno()
            if error == errno.EACCES and attempt == 0:
                if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                    break
                continue
            break
        if error != errno.EINVAL:  # EINVAL: a kernel without WAIT_KILLABLE_RECV, try without
            break
    raise OSError(error, f"seccomp: {os.strerror(error)}")


class Supervisor:
    """Answers the notifications of one listener: statfs for files of the mount with device
    `device`; with `mounts`, opens of the mount tables, which then show the mount as cgroup2;
    with `cgroup_of`, opens of /proc/PID/cgroup, answered with the cgroup it names for a task
    (a TID in this process's PID namespace, or in that of a process of it), None if none;
    with `cgroup_bpf`, bpf(2) calls on the mount's cgroups, made on the kernel's."""

    def __init__(self, listener: int, device: int, mounts: bool = False,
                 cgroup_of: Callable[[int, int | None], str | None] | None = None,
                 cgroup_bpf: CgroupBpf | None = None) -> None:
        self.listener = listener
        self.device = device
        self.mounts = mounts
        self.cgroup_of = cgroup_of
        self.cgroup_bpf = cgroup_bpf
        # What a name opened must have to be one of those files: most opens run at once.
        self._words = (*(("mount", "/etc/mtab") if mounts else ()),
                       *(("cgroup",) if cgroup_of else ()))

    def answer_one(self) -> None:
        """Receive one notification and answer it; a caller gone meanwhile is no error."""
        buffer = bytearray(_NOTIF.size)
        if _ioctl(self.listener, _IOCTL_RECV, buffer) != 0:
            return  # ENOENT: the caller was interrupted; EINTR
        notif_id, pid, _, nr, _, _, *args = _NOTIF.unpack(buffer)
        arch = _ARCHES[platform.machine()]
        try:
            if nr in (arch.statfs, arch.fstatfs):
                if self._statfs(notif_id, pid, nr, args):
                    _ioctl(self.listener, _IOCTL_SEND,
                           bytearray(_RESP.pack(notif_id, 0, 0, 0)))
                    return
            elif self.cgroup_bpf is not None and nr == bpf_number():
                answer = self.cgroup_bpf.call(pid, args, lambda: self._valid(notif_id))
                if answer is not None:
                    value, error = answer
                    _ioctl(self.listener, _IOCTL_SEND,
                           bytearray(_RESP.pack(notif_id, value if value >= 0 else 0,
                                                -error, 0)))
                    return
            elif self._open(notif_id, pid, nr, args):
                return  # answered with the descriptor
        except Exception:  # noqa: BLE001 - nothing the caller does may end the supervisor
            pass  # its files or memory could not be read, or made no sense: the kernel answers
        _ioctl(self.listener, _IOCTL_SEND,
               bytearray(_RESP.pack(notif_id, 0, 0, _USER_NOTIF_FLAG_CONTINUE)))

    def _open(self, notif_id: int, pid: int, nr: int, args: list[int]) -> bool:
        """Answer an open of a file this supervisor shows otherwise (a memfd of its text);
        False to let the open run."""
        arch = _ARCHES[platform.machine()]
        openat2 = nr == arch.openat2
        # open(path, flags); openat(dirfd, path, flags); openat2(dirfd, path, &how, size)
        dirfd, path_at = ((_AT_FDCWD, 0) if nr == arch.open
                          else (ctypes.c_int32(args[0]).value, 1))
        name = os.fsdecode(caller.read_string(pid, args[path_at]))
        if not any(word in name for word in self._words):
            return False
        flags = (struct.unpack("=Q", caller.read_bytes(pid, args[2], 8))[0] if openat2
                 else args[path_at + 1])
        if flags & os.O_ACCMODE != os.O_RDONLY:
            return False
        if not name.startswith("/"):
            base = f"/proc/{pid}/cwd" if dirfd == _AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
            name = os.path.join(os.readlink(base), name)
        parts = name.split("/")
        if parts[-1] in ("", ".", "..") or ".." in parts:
            return False  # not a file of a known directory ("cgroup/" is ENOTDIR): the kernel's
        text = self._text_of(pid, os.path.normpath(name))
        if text is None:
            return False
        memfd = os.memfd_create("encidfs-proc", os.MFD_CLOEXEC)
        try:
            os.write(memfd, text)
            os.lseek(memfd, 0, os.SEEK_SET)
            if not self._valid(notif_id):
                return False
            request = _ADDFD.pack(notif_id, _ADDFD_FLAG_SEND, memfd, 0, flags & os.O_CLOEXEC)
            return _ioctl(self.listener, _IOCTL_ADDFD, bytearray(request)) >= 0
        finally:
            os.close(memfd)

    def _text_of(self, pid: int, name: str) -> bytes | None:
        """What process `pid` reads in file `name`, if this supervisor answers it."""
        match = _PROC_FILE.fullmatch("/proc/self/mounts" if name == "/etc/mtab" else name)
        if match is None:
            return None
        owner, task, table = match.groups()
        if table == "cgroup":
            return None if self.cgroup_of is None or owner is None \
                else self._cgroup_file(pid, owner, task)
        if not self.mounts:
            return None
        whose = task or (str(pid) if owner in (None, "self", "thread-self") else owner)
        with open(f"/proc/{whose}/mountinfo", "rb") as f:
            ours = _mountpoints_of(f.read(), self.device)
        with open(f"/proc/{whose}/{table}", "rb") as f:
            return _as_cgroup2(f.read(), table, ours)

    def _cgroup_file(self, pid: int, owner: str, task: str | None) -> bytes | None:
        """/proc/OWNER[/task/TASK]/cgroup as the daemon's books have it, for caller `pid`."""
        assert self.cgroup_of is not None
        if task is not None or owner.isdigit():  # named in the caller's PID namespace
            cgroup = self.cgroup_of(int(task or owner), pid)
        else:  # the caller's thread, or its process's leader
            cgroup = self.cgroup_of(pid if owner == "thread-self" else caller.tgid(pid), None)
        return None if cgroup is None else b"0::%s\n" % os.fsencode(cgroup)

    def _statfs(self, notif_id: int, pid: int, nr: int, args: list[int]) -> bool:
        """Answer a statfs or fstatfs on a file of the mount; False to let it run."""
        fstatfs = nr == _ARCHES[platform.machine()].fstatfs
        if fstatfs:
            path = f"/proc/{pid}/fd/{args[0]}"
        else:
            name = caller.read_string(pid, args[0])
            base = "root" if name.startswith(b"/") else "cwd"
            path = os.fsdecode(b"/proc/%d/%s/%s" % (pid, base.encode(), name.lstrip(b"/")))
        if not self._valid(notif_id) or os.stat(path).st_dev != self.device:
            return False
        answer = ctypes.create_string_buffer(_STATFS_SIZE)
        if _libc.statfs(os.fsencode(path), answer) != 0:
            return False
        struct.pack_into("=q", answer, 0, CGROUP2_SUPER_MAGIC)
        if not self._valid(notif_id):
            return False
        caller.write_bytes(pid, args[1], answer.raw)
        return True

    def _valid(self, notif_id: int) -> bool:
        """Whether the caller still waits for this answer (its PID is still its own)."""
        return _ioctl(self.listener, _IOCTL_ID_VALID, bytearray(struct.pack("=Q", notif_id))) == 0


def _ioctl(fd: int, request: int, buffer: bytearray) -> int:
    argument = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return _libc.ioctl(fd, ctypes.c_ulong(request), argument)


def _mountpoints_of(mountinfo: bytes, device: int) -> set[bytes]:
    """Where the mount with `device` is mounted (as mountinfo escapes a path, as mounts does)."""
    number = b"%d:%d" % (os.major(device), os.minor(device))
    rows = (line.split(b" ") for line in mountinfo.splitlines())
    return {fields[4] for fields in rows if len(fields) > 4 and fields[2] == number}


def _as_cgroup2(text: bytes, table: str, ours: set[bytes]) -> bytes:
    """A mount table in which the mount at `ours` is the cgroup2 file system, and what it
    hides (mounted before it at or below its mountpoint, as the host's cgroup v1 hierarchies)
    is gone."""
    where = 1 if table == "mounts" else 4  # the mountpoint's field
    kept: list[list[bytes]] = []
    for fields in (line.split(b" ") for line in text.splitlines()):
        if len(fields) <= where:
            continue
        if fields[where] not in ours:
            kept.append(fields)
            continue
        if table == "mounts":
            fields[0] = fields[2] = b"cgroup2"
            fields[3] = b"rw,nosuid,nodev,noexec,relatime"
        elif b"-" in fields:
            dash = fields.index(b"-")
            fields[dash + 1:] = [b"cgroup2", b"cgroup2", b"rw"]
        top = fields[where].rstrip(b"/") + b"/"
        kept = [row for row in kept if not (row[where] + b"/").startswith(top)]
        kept.append(fields)
    return b"".join(b" ".join(fields) + b"\n" for fields in kept)


def main() -> int:
    """python -m encidfs.exec.seccomp SOCKET [--opens] [--bpf] -- CMD [ARGS...]: install the filter
    (with --opens, for the calls that open a file too; with --bpf, for bpf(2)), hand its
    listener over SOCKET (then closed), and exec CMD."""
    sock_fd, options = int(sys.argv[1]), sys.argv[2:sys.argv.index("--")]
    argv = sys.argv[sys.argv.index("--") + 1:]
    with socket.socket(fileno=sock_fd) as channel:
        try:
            listener = install("--opens" in options, "--bpf" in options)
        except OSError as error:  # seccomp off in this kernel, or refused: CMD runs without
            print(f"encidfs exec: statfs is not answered as cgroup2's ({error.strerror})",
                  file=sys.stderr)
        else:
            socket.send_fds(channel, [b"L"], [listener])
            os.close(listener)
    os.execvp(argv[0], argv)
    return 127


if __name__ == "__main__":
    sys.exit(main())
