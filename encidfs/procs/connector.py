"""The kernel's process events connector (netlink, CN_IDX_PROC): forks, new threads and thread
exits as they happen.

Before Linux 6.6 it needs CAP_NET_ADMIN in the initial namespaces; `open_connector` returns None
where it is not to be had, and the tracker then falls back to reading /proc.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXIT = 0x80000000

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in Python's socket module
RECEIVE_BUFFER = 8 << 20  # bytes: some 50,000 events
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=iiii")  # parent pid, parent tgid, child pid, child tgid
_EXIT = struct.Struct("=ii")  # pid, tgid (exit code and signal follow)


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
    # Room for bursts (every process's forks, exits and threads come here): events that do not
    # fit are lost (ENOBUFS) and the tracker has to scan /proc, which places less exactly.
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # the first needs CAP_NET_ADMIN
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            break
        except OSError:
            continue
    sock.setblocking(False)
    return sock


class Fork(NamedTuple):
    """A new process: `creator` is the thread that forked it, of process `parent`."""
    creator: int
    parent: int
    child: int


class Thread(NamedTuple):
    """A thread of process `tgid` started (`exited` false) or exited."""
    tgid: int
    tid: int
    exited: bool


def events(datagram: bytes) -> list[Fork | Thread]:
    """The forks, new threads and exits a datagram announces."""
    found: list[Fork | Thread] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length = _NLMSGHDR.unpack_from(datagram, offset)[0]
        if length < _NLMSGHDR.size:
            break
        event = offset + _NLMSGHDR.size + _CN_MSG.size
        data = event + _PROC_EVENT.size
        if data + _FORK.size <= offset + length:
            what = _PROC_EVENT.unpack_from(datagram, event)[0]
            if what == PROC_EVENT_FORK:
                # A thread's parent is its process's parent (CLONE_THREAD keeps real_parent):
                # the thread that made it is not told.
                creator, parent, child, child_tgid = _FORK.unpack_from(datagram, data)
                if child == child_tgid:
                    found.append(Fork(creator, parent, child))
                else:
                    found.append(Thread(child_tgid, child, False))
            elif what == PROC_EVENT_EXIT:
                tid, tgid = _EXIT.unpack_from(datagram, data)
                found.append(Thread(tgid, tid, True))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return found
