"""The kernel's process events connector (netlink, CN_IDX_PROC): fork events as they happen.

Before Linux 6.6 it needs CAP_NET_ADMIN in the initial namespaces; `open_connector` returns None
where it is not to be had, and the tracker then falls back to reading /proc.
"""

from __future__ import annotations

import socket
import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=iiii")  # parent pid, parent tgid, child pid, child tgid


def open_connector() -> socket.socket | None:
    """A non-blocking socket subscribed to process events, or None without the privilege."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError:
        return None
    try:
        # Port 0: the kernel picks one free in the network namespace, which PID namespaces
        # share (our PID may be another daemon's port there).
        sock.bind((0, CN_IDX_PROC))
        port = sock.getsockname()[0]
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, port) + body)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def forks(datagram: bytes) -> list[tuple[int, int]]:
    """(parent TGID, child PID) for each new process (not thread) a datagram announces."""
    found = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length = _NLMSGHDR.unpack_from(datagram, offset)[0]
        if length < _NLMSGHDR.size:
            break
        event = offset + _NLMSGHDR.size + _CN_MSG.size
        if event + _PROC_EVENT.size + _FORK.size <= offset + length:
            what = _PROC_EVENT.unpack_from(datagram, event)[0]
            if what == PROC_EVENT_FORK:
                _, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(
                    datagram, event + _PROC_EVENT.size)
                if child_pid == child_tgid:
                    found.append((parent_tgid, child_pid))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return found
