"""The control socket server: framing, peer credentials, one task per connection.

Everything a client can make the daemon hold is bounded: connections (per user and in all),
a request's bytes (MAX_LINE), and replies waiting for a reader (a reply that cannot be handed
to a client within SEND_TIMEOUT drops the connection; all of them together take at most
REPLY_BUDGET bytes, beyond which a request is answered ENOBUFS).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import struct

import trio

from .protocol import MAX_LINE, decode, encode, error_reply
from .service import ControlService, Peer

log = logging.getLogger(__name__)
_UCRED = struct.Struct("=iII")  # pid, uid, gid

MAX_CONNECTIONS_PER_UID = 64
SEND_TIMEOUT = 5.0  # seconds a client has to take a reply
REPLY_BUDGET = 64 << 20  # bytes of replies being sent, over all connections


class Limits:
    """What the connections of all clients hold together."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.connections: collections.Counter[int] = collections.Counter()  # by uid
        self.reply_bytes = 0

    def refusal(self, uid: int) -> dict | None:
        """An error reply for a connection over the limits, or None to take it."""
        if sum(self.connections.values()) >= self.max_connections:
            return error_reply(errno.EAGAIN, "the daemon has too many connections")
        if self.connections[uid] >= MAX_CONNECTIONS_PER_UID:
            return error_reply(errno.EAGAIN, f"user {uid} has {MAX_CONNECTIONS_PER_UID} "
                                             "connections open already")
        return None


async def serve_control(path: str, service: ControlService, max_connections: int,
                        mode: int, gid: int | None, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on a socket at `path` with the given mode and group: who can connect may ask,
    and what they may do is decided per request."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # a --control of one's own
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that died; this mount is ours now
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # nobody else may connect before the mode is set
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    limits = Limits(max_connections)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(128)
        task_status.started()
        await trio.serve_listeners(lambda stream: _connection(stream, service, limits),
                                   [trio.SocketListener(sock)])
    finally:
        os.unlink(path)


async def _connection(stream: trio.SocketStream, service: ControlService,
                      limits: Limits) -> None:
    pid, uid, gid = _UCRED.unpack(stream.socket.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    async with stream:
        refusal = limits.refusal(uid)
        if refusal is not None:
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(encode(refusal))
            return
        limits.connections[uid] += 1
        service.connected += 1
        try:
            await _serve(stream, service, limits, Peer(pid, uid, gid))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away, or would not read: nothing it asked is half done
        except Exception:
            log.exception("control connection from pid %d failed", pid)
        finally:
            limits.connections[uid] -= 1
            service.connected -= 1
            if not limits.connections[uid]:
                del limits.connections[uid]


async def _serve(stream: trio.SocketStream, service: ControlService, limits: Limits,
                 peer: Peer) -> None:
    pending = bytearray()
    while data := await stream.receive_some(MAX_LINE):
        pending += data
        while (end := pending.find(b"\n")) >= 0 and end <= MAX_LINE:
            line = bytes(pending[:end])
            del pending[:end + 1]
            await _reply(stream, encode(await _answer(line, service, peer)), limits)
        if len(pending) > MAX_LINE:
            await _reply(stream, encode(error_reply(errno.E2BIG, "request too long")), limits)
            return


async def _reply(stream: trio.SocketStream, reply: bytes, limits: Limits) -> None:
    """Send a reply within SEND_TIMEOUT (trio.TooSlowError otherwise) and within the budget
    of replies in flight (ENOBUFS in its place otherwise)."""
    if limits.reply_bytes + len(reply) > REPLY_BUDGET:
        reply = encode(error_reply(errno.ENOBUFS, "too many replies are waiting for their "
                                                  "readers; try again"))
    limits.reply_bytes += len(reply)
    try:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(reply)
    finally:
        limits.reply_bytes -= len(reply)


async def _answer(line: bytes, service: ControlService, peer: Peer) -> dict:
    try:
        request = decode(line)
    except ValueError:
        return error_reply(errno.EINVAL, "a request is one JSON object on one line")
    return await service.handle(request, peer)
