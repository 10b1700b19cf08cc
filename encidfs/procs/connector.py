"""The kernel's process events connector (netlink, CN_IDX_PROC): forks, new threads and thread
exits as they happen.

Before Linux 6.6 it needs CAP_NET_ADMIN in the initial namespaces; `Connector.open` returns None
where it is not to be had, and the tracker then falls back to reading /proc.  From 6.6 on, a
listener chooses the event types it gets (cn_filter()): nothing while no process is a member,
then forks only, and thread exits only while some process has threads in more than one cgroup,
so that the host's exits and execs cost the daemon nothing, nor its forks while nothing is
followed.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Container
from typing import NamedTuple

from ..host.release import kernel_release

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXIT = 0x80000000
FILTER_SINCE = (6, 6)  # struct proc_input: a listener's event types

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in Python's socket module
# Bytes the kernel may queue for the daemon (it doubles the figure): some 80,000 events, at
# 832 bytes each (an skb's truesize), seconds of a host forking as fast as it can.
RECEIVE_BUFFER = 32 << 20
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_AT = _NLMSGHDR.size + _CN_MSG.size
# proc_event's what, cpu and timestamp_ns, then a fork's parent pid and tgid and child pid and
# tgid, or an exit's pid and tgid (its exit code and signal follow).
_EVENT = struct.Struct("=I4x8xiiii")
_MESSAGE = _EVENT_AT + _EVENT.size


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


class Connector:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._port = sock.getsockname()[0]
        self.filtering = kernel_release() >= FILTER_SINCE
        self.forks = False  # whether forks are asked for (without the filter: everything)
        self.exits = False  # whether thread exits are asked for too
        self._buffer = bytearray(4096)

    @classmethod
    def open(cls) -> Connector | None:
        """A non-blocking socket on the process events, or None without the privilege.  It is
        told nothing until listen() (on a kernel without the filter: everything from now)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError:
            return None
        try:
            # Port 0: the kernel picks one free in the network namespace, which PID
            # namespaces share (our PID may be another daemon's port there).
            sock.bind((0, CN_IDX_PROC))
            connector = cls(sock)
            # Without a choice of its own, a socket gets what any other listener asked for.
            connector._send(PROC_CN_MCAST_IGNORE if connector.filtering
                            else PROC_CN_MCAST_LISTEN)
        except OSError:
            sock.close()
            return None
        connector.forks = connector.exits = not connector.filtering
        # Room for bursts: events that do not fit are lost (ENOBUFS) and the tracker has to
        # look at /proc, which cannot place everything.
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # the first needs CAP_NET_ADMIN
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
                break
            except OSError:
                continue
        sock.setblocking(False)
        return connector

    def fileno(self) -> int:
        return self._sock.fileno()

    def listen(self, forks: bool, exits: bool = False) -> None:
        """Ask for forks (and new threads), and for thread exits too if `exits`; for nothing
        unless `forks`.  Events queued while nothing was asked for are dropped: they tell of
        a time no process was followed."""
        exits = forks and exits
        if not self.filtering or (forks, exits) == (self.forks, self.exits):
            return
        wanted = (PROC_EVENT_FORK | (PROC_EVENT_EXIT if exits else 0)) if forks else 0
        self._send(PROC_CN_MCAST_LISTEN if forks else PROC_CN_MCAST_IGNORE, wanted)
        if forks and not self.forks:
            self.drain((), (), lambda event: None)
        self.forks, self.exits = forks, exits

    def _send(self, op: int, wanted: int = 0) -> None:
        """PROC_CN_MCAST_LISTEN or _IGNORE, with the event types where the kernel filters."""
        data = struct.pack("=II", op, wanted) if self.filtering else struct.pack("=I", op)
        body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(data), 0) + data
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0,
                                       self._port) + body)

    def drain(self, parents: Container[int], split: Container[int],
              apply: Callable[[Fork | Thread], None]) -> bool:
        """Read every event queued, and apply() in order those of forks by `parents` and of
        thread changes of `split` processes (both as they are at each event: a child adopted
        is a parent for the events after); return whether events were lost (ENOBUFS)
        meanwhile.  Everything else is dropped before any object is made for it: the host's
        forks pass through here."""
        lost = False
        buffer = self._buffer
        receive = self._sock.recv_into
        unpack = _EVENT.unpack_from
        while True:
            try:
                size = receive(buffer)
            except BlockingIOError:
                return lost
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            offset = 0
            while offset + _MESSAGE <= size:  # one message a datagram, as cn_proc sends them
                what, a, b, c, d = unpack(buffer, offset + _EVENT_AT)
                if what == PROC_EVENT_FORK:
                    # A thread's parent is its process's parent (CLONE_THREAD keeps
                    # real_parent): the thread that made it is not told.
                    if c == d:
                        if b in parents:
                            apply(Fork(a, b, c))
                    elif d in split:
                        apply(Thread(d, c, False))
                elif what == PROC_EVENT_EXIT and b in split:
                    apply(Thread(b, a, True))
                length = _NLMSGHDR.unpack_from(buffer, offset)[0]
                if length < _NLMSGHDR.size:
                    break
                offset += (length + 3) & ~3  # NLMSG_ALIGN
