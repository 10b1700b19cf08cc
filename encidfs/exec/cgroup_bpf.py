"""bpf(2) on a cgroup of a mount over DIR, made on the kernel's cgroup behind it.

A container runtime restricts devices with a BPF program attached to the container's cgroup
(runc: BPF_PROG_QUERY for what is attached, BPF_PROG_ATTACH, and BPF_PROG_DETACH of what it
replaces), given a descriptor of the cgroup's directory.  Under `encidfs exec` that
directory is the mount's, which the kernel does not take for a cgroup (EBADF).  On a mount
over DIR, every directory stands for a cgroup of the kernel's: the supervisor makes the call
on that one, with the caller's program descriptors copied (pidfd_getfd), and writes what a
query returns into the caller's memory.  On the standalone tree there is no kernel cgroup to
attach to, and the kernel's EBADF stands.

The call is made with the supervisor's credentials, so it is made only for a caller that
could have made it itself on the kernel's cgroup: CAP_NET_ADMIN and CAP_BPF (or
CAP_SYS_ADMIN), effective, in the supervisor's user namespace.  Any other caller, command or
form of the call (flags this does not know, a larger attr than these commands have) gets the
kernel's own answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Callable

from ..host.mountinfo import mounts_of
from . import caller

PROG_ATTACH, PROG_DETACH, PROG_QUERY = 8, 9, 16
_F_REPLACE = 1 << 2
_ATTACH_FLAGS = 1 << 0 | 1 << 1 | _F_REPLACE  # ALLOW_OVERRIDE, ALLOW_MULTI, REPLACE
# union bpf_attr as these commands use it, up to the fields runc and systemd pass:
# query: target_fd, attach_type, query_flags, attach_flags (out), prog_ids (u64), prog_cnt
# attach/detach: target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd
_SIZES = {PROG_QUERY: 28, PROG_ATTACH: 20, PROG_DETACH: 20}
_ATTR_MAX = 32  # runc passes 32 for a query; more (newer kernels' fields) is left alone
_MOST_PROGRAMS = 64  # BPF_CGROUP_MAX_PROGS: programs of one type a cgroup may have attached
_NO_PROGRAM = 0xFFFFFFFF  # an attach_bpf_fd no process has: detach's "no program named"
_CAPABILITIES = (12, 39, 21)  # CAP_NET_ADMIN; CAP_BPF or CAP_SYS_ADMIN
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


def bpf_number() -> int:
    return _NR_BPF[platform.machine()]


class CgroupBpf:
    """Redirects the cgroup bpf calls naming a directory of the mount with `device`, mounted
    over the kernel's cgroup `over`."""

    def __init__(self, device: int, over: str) -> None:
        self.device = device
        self.over = over

    def call(self, pid: int, args: list[int], still_waiting: Callable[[], bool]
             ) -> tuple[int, int] | None:
        """(return value, errno) of the call made on the kernel's cgroup; None to let the
        kernel answer.  `still_waiting()` tells whether the caller still waits (its PID and
        memory are still its own)."""
        command, attr, size = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
        if command not in _SIZES or not _SIZES[command] <= size <= _ATTR_MAX:
            return None
        fields = bytearray(caller.read_bytes(pid, attr, size))
        target, program, _, flags, replaced = struct.unpack_from("=5I", fields.ljust(20, b"\0"))
        if os.stat(f"/proc/{pid}/fd/{target}").st_dev != self.device \
                or not _may_attach(pid) or command == PROG_ATTACH and flags & ~_ATTACH_FLAGS:
            return None
        with contextlib.ExitStack() as held:
            cgroup = os.open(self._kernel_cgroup(pid, target),
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            held.callback(os.close, cgroup)
            struct.pack_into("=I", fields, 0, cgroup)
            if command == PROG_QUERY:
                return self._query(pid, attr, fields, still_waiting)
            process = os.pidfd_open(caller.tgid(pid))
            held.callback(os.close, process)
            if not still_waiting():  # the PID is the caller's: its descriptors are
                return None
            struct.pack_into("=I", fields, 4, _taken(held, process, program, command))
            if command == PROG_ATTACH and flags & _F_REPLACE:
                struct.pack_into("=I", fields, 16, _taken(held, process, replaced, command))
            return _bpf(command, fields)

    def _query(self, pid: int, attr: int, fields: bytearray,
               still_waiting: Callable[[], bool]) -> tuple[int, int] | None:
        """A query, its answer written where the caller's attr says."""
        ids_at, room = struct.unpack_from("=QI", fields, 16)
        # The caller's room sizes a buffer of ours: no more than a cgroup can hold, which the
        # kernel's answer (at most that many, ENOSPC past the room) does not tell apart.
        room = min(room, _MOST_PROGRAMS)
        struct.pack_into("=I", fields, 24, room)
        ids = ctypes.create_string_buffer(4 * max(room, 1))
        struct.pack_into("=Q", fields, 16, ctypes.addressof(ids) if ids_at else 0)
        result = _bpf(PROG_QUERY, fields)
        if result[0] != 0 and result[1] != errno.ENOSPC:  # ENOSPC still tells the count
            return result
        attach_flags, = struct.unpack_from("=I", fields, 12)
        count, = struct.unpack_from("=I", fields, 24)
        if not still_waiting():
            return None
        if ids_at:
            caller.write_bytes(pid, ids_at, ids.raw[:4 * min(room, count)])
        caller.write_bytes(pid, attr + 12, struct.pack("=I", attach_flags))
        caller.write_bytes(pid, attr + 24, struct.pack("=I", count))
        return result

    def _kernel_cgroup(self, pid: int, fd: int) -> str:
        """The kernel's cgroup behind the caller's directory `fd` of the mount: its path in
        the caller's mount namespace, less where the mount is mounted there."""
        path = os.readlink(f"/proc/{pid}/fd/{fd}")
        inside = [(mountpoint, root) for mountpoint, root in mounts_of(self.device, pid)
                  if path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")]
        if not inside:
            raise FileNotFoundError(errno.ENOENT, f"{path} is not in the mount")
        mountpoint, root = max(inside, key=lambda found: len(found[0]))
        relative = os.path.relpath(os.path.join(root, os.path.relpath(path, mountpoint)), "/")
        if relative.startswith(".."):
            raise FileNotFoundError(errno.ENOENT, f"{path} is not in the mount")
        return os.path.normpath(os.path.join(self.over, relative))


def _may_attach(pid: int) -> bool:
    """Whether the caller could attach a program to a cgroup itself (bpf_capable() and
    CAP_NET_ADMIN, in the initial user namespace: the supervisor's)."""
    if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
        return False
    with open(f"/proc/{pid}/status") as f:
        effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    net_admin, bpf, sys_admin = (effective >> bit & 1 for bit in _CAPABILITIES)
    return bool(net_admin and (bpf or sys_admin))


def _taken(held: contextlib.ExitStack, process: int, fd: int, command: int) -> int:
    """A copy of the caller's program descriptor `fd`; for a detach, one it does not have
    stands for none (the kernel then detaches without a program named)."""
    try:
        copy = caller.take_descriptor(process, fd)
    except OSError:
        if command == PROG_DETACH:
            return _NO_PROGRAM
        raise
    held.callback(os.close, copy)
    return copy


def _bpf(command: int, fields: bytearray) -> tuple[int, int]:
    attr = (ctypes.c_char * len(fields)).from_buffer(fields)
    result = _libc.syscall(_NR_BPF[platform.machine()], command, attr, len(fields))
    return (result, 0) if result >= 0 else (-1, ctypes.get_errno())
