"""statfs(2) and fstatfs(2) answered as cgroup2's, for files of an encidfs mount, under
`encidfs exec`: tools that ask the kernel what /sys/fs/cgroup is (systemd, crun, runc) take the
mount for the cgroup2 file system it looks like.

The command installs a seccomp filter just before its exec (`python -m encidfs.seccomp SOCKET
-- CMD`): statfs and fstatfs go to a supervisor (SECCOMP_RET_USER_NOTIF), every other call runs
as it would.  The supervisor is `encidfs exec` itself, the command's parent, which receives the
filter's listener on SOCKET.  For a call on a file of the mount (by device number, read
through the caller's /proc/PID/root, cwd or fd) it makes the real call, sets f_type to
CGROUP2_SUPER_MAGIC and writes the answer into the caller's memory; any other call it lets run
(SECCOMP_USER_NOTIF_FLAG_CONTINUE), so that its answer is the kernel's.  A notification is
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
import socket
import struct
import sys

CGROUP2_SUPER_MAGIC = 0x63677270
_libc = ctypes.CDLL(None, use_errno=True)

# x86_64 and aarch64: the architecture's audit number, statfs, fstatfs, seccomp.
_ARCHES = {"x86_64": (0xC000003E, 137, 138, 317), "aarch64": (0xC00000B7, 43, 44, 277)}
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
_STATFS_SIZE = 120  # struct statfs on a 64-bit architecture; f_type is its first word
_PATH_MAX = 4096


def supported() -> bool:
    return platform.machine() in _ARCHES


def _filter() -> bytes:
    """The BPF program: statfs and fstatfs of this architecture notify, all else is allowed."""
    arch, statfs, fstatfs, _ = _ARCHES[platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|K
    program = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, 3, arch),  # another architecture's calls: allowed
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jeq, 2, 0, statfs),
        (jeq, 1, 0, fstatfs),
        (ret, 0, 0, _RET_ALLOW),
        (ret, 0, 0, _RET_USER_NOTIF),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def install() -> int:
    """Install the filter on this process; return its listener.  Without CAP_SYS_ADMIN the
    kernel wants no_new_privs first (set only then: a setuid program keeps working as root)."""
    code = _filter()
    instructions = ctypes.create_string_buffer(code, len(code))
    program = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(instructions))
    prog = ctypes.create_string_buffer(program, len(program))
    number = _ARCHES[platform.machine()][3]
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
    """Answers the notifications of one listener for files of the mount with device `device`."""

    def __init__(self, listener: int, device: int) -> None:
        self.listener = listener
        self.device = device

    def answer_one(self) -> None:
        """Receive one notification and answer it; a caller gone meanwhile is no error."""
        buffer = bytearray(_NOTIF.size)
        if _ioctl(self.listener, _IOCTL_RECV, buffer) != 0:
            return  # ENOENT: the caller was interrupted; EINTR
        notif_id, pid, _, nr, _, _, *args = _NOTIF.unpack(buffer)
        answer = None
        try:
            answer = self._statfs(notif_id, pid, nr, args)
        except OSError:
            answer = None  # the caller's files or memory could not be read: the kernel answers
        response = (_RESP.pack(notif_id, 0, 0, 0) if answer else
                    _RESP.pack(notif_id, 0, 0, _USER_NOTIF_FLAG_CONTINUE))
        _ioctl(self.listener, _IOCTL_SEND, bytearray(response))

    def _statfs(self, notif_id: int, pid: int, nr: int, args: list[int]) -> bool:
        """Answer a statfs or fstatfs on a file of the mount; False to let it run."""
        fstatfs = nr == _ARCHES[platform.machine()][2]
        if fstatfs:
            path = f"/proc/{pid}/fd/{args[0]}"
        else:
            name = _read_string(pid, args[0])
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
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
            memory.seek(args[1])
            memory.write(answer.raw)
        return True

    def _valid(self, notif_id: int) -> bool:
        """Whether the caller still waits for this answer (its PID is still its own)."""
        return _ioctl(self.listener, _IOCTL_ID_VALID, bytearray(struct.pack("=Q", notif_id))) == 0


def _ioctl(fd: int, request: int, buffer: bytearray) -> int:
    argument = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return _libc.ioctl(fd, ctypes.c_ulong(request), argument)


def _read_string(pid: int, address: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        memory.seek(address)
        text = b""
        while len(text) < _PATH_MAX:  # a page at a time: the string may end before a page
            chunk = memory.read(4096 - (address + len(text)) % 4096)
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                return text + chunk[:end]
            text += chunk
    raise OSError(errno.ENAMETOOLONG, "no path")


def main() -> int:
    """python -m encidfs.seccomp SOCKET -- CMD [ARGS...]: install the filter, hand its
    listener over SOCKET (then closed), and exec CMD."""
    sock_fd, argv = int(sys.argv[1]), sys.argv[3:]
    with socket.socket(fileno=sock_fd) as channel:
        try:
            listener = install()
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
