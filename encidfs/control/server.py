"""The control socket server: framing, peer credentials, one task per connection."""

from __future__ import annotations

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


async def serve_control(path: str, service: ControlService, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that died; this mount is ours now
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    try:
        os.chmod(path, 0o666)  # anyone may ask; what they may do is decided per request
        sock.listen(128)
        task_status.started()
        await trio.serve_listeners(lambda stream: _connection(stream, service),
                                   [trio.SocketListener(sock)])
    finally:
        os.unlink(path)


async def _connection(stream: trio.SocketStream, service: ControlService) -> None:
    pid, uid, gid = _UCRED.unpack(stream.socket.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    peer = Peer(pid, uid, gid)
    pending = bytearray()
    try:
        async with stream:
            while data := await stream.receive_some(MAX_LINE):
                pending += data
                while (end := pending.find(b"\n")) >= 0 and end <= MAX_LINE:
                    line = bytes(pending[:end])
                    del pending[:end + 1]
                    await stream.send_all(encode(_reply(line, service, peer)))
                if len(pending) > MAX_LINE:
                    await stream.send_all(encode(error_reply(errno.E2BIG, "request too long")))
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing it asked for is left half done
    except Exception:
        log.exception("control connection from pid %d failed", pid)


def _reply(line: bytes, service: ControlService, peer: Peer) -> dict:
    try:
        request = decode(line)
    except ValueError:
        return error_reply(errno.EINVAL, "a request is one JSON object on one line")
    return service.handle(request, peer)
