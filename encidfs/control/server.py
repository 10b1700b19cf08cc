"""The control socket server: one task, one epoll set, the requests of all clients in rounds.

A round takes the next line of every connection that has one, has the service answer them
together (it group-commits the allocations and frees among them: one journal commit for the
round), and hands each connection its reply without blocking.  What a client does not take
waits in its connection's buffer, and that connection is not read again until the buffer is
empty.  One task and one commit a round, not a task a connection and a loop turn a group:
twice the round trips (8 clients, measured side by side: 10,600 a second against 5,200).

Everything a client can make the daemon hold is bounded: connections, a request's bytes
(MAX_LINE), a round's requests (one a connection), and replies waiting for a reader (a
connection whose replies have not moved for SEND_TIMEOUT is dropped; all of them together take
at most REPLY_BUDGET bytes, beyond which a request is answered ENOBUFS).  Connections and
replies are budgets shared out per user (engine/budget.py).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import struct

import trio

from ..engine.budget import Budget
from .protocol import MAX_LINE, decode, encode, error_reply
from .service import ControlService, Peer

log = logging.getLogger(__name__)
_UCRED = struct.Struct("=iII")  # pid, uid, gid

MAX_CONNECTIONS_PER_UID = 64
SEND_TIMEOUT = 5.0  # seconds a client has to take a reply
REPLY_BUDGET = 64 << 20  # bytes of replies waiting for their readers, over all connections
ACCEPTS_PER_ROUND = 16
ROUNDS_PER_WAKEUP = 4
# A connection's lines are answered one a round, as a client that waits for each reply: each
# sees what the one before it did (a round's checks all come before its commit).  The others
# wait in its buffer, which is not read again before they are taken.
ACCEPT_RETRY = 0.1  # seconds before accepting again after accept(2) failed
_TOO_LONG = None  # in a round's requests: a line over MAX_LINE


class Limits:
    """What the connections of all clients hold together, by user."""

    def __init__(self, max_connections: int, owners: frozenset[int], share: float) -> None:
        self.connections = Budget("connections", max_connections, errno.EAGAIN, owners, share,
                                  most=MAX_CONNECTIONS_PER_UID)
        self.replies = Budget("bytes of replies waiting for their readers", REPLY_BUDGET,
                              errno.ENOBUFS, owners, share)

    def refusal(self, uid: int) -> dict | None:
        """An error reply for a connection over the limits, or None to take it."""
        try:
            self.connections.check(uid)
        except OSError as error:
            return error_reply(error.errno or errno.EIO, error.strerror or str(error))
        return None


class _Connection:
    __slots__ = ("sock", "fd", "peer", "received", "replies", "moved_at", "reading",
                 "interest", "closed")

    def __init__(self, sock: socket.socket, peer: Peer) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.received = bytearray()  # the start of a line still to come
        self.replies = bytearray()  # not taken by the client yet
        self.moved_at = 0.0  # when the client last took some of them
        self.reading = True  # until the client has said all it will (EOF, a line too long)
        self.interest = select.EPOLLIN
        self.closed = False


async def serve_control(path: str, service: ControlService, limits: Limits,
                        mode: int, gid: int | None, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on a socket at `path` with the given mode and group: who can connect may ask,
    and what they may do is decided per request."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # a --control of one's own
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that died; this mount is ours now
    listener = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    with listener:
        old_umask = os.umask(0o177)  # nobody else may connect before the mode is set
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
            listener.listen(128)
            task_status.started()
            await _Server(listener, service, limits).run()
        finally:
            os.unlink(path)


class _Server:
    def __init__(self, listener: socket.socket, service: ControlService,
                 limits: Limits) -> None:
        self.listener = listener
        self.service = service
        self.limits = limits
        self._epoll = select.epoll()
        self._connections: dict[int, _Connection] = {}  # by descriptor
        self._waiting: dict[_Connection, None] = {}  # the ones with replies not taken
        self._backlog: dict[_Connection, None] = {}  # the ones with whole lines not taken
        self._accept_at = 0.0  # when to accept again, after descriptors ran out

    async def run(self) -> None:
        self._epoll.register(self.listener.fileno(), select.EPOLLIN)
        try:
            while True:
                if self._lines_waiting():
                    await trio.lowlevel.checkpoint()  # no wait for more
                else:
                    with trio.move_on_at(self._next_deadline()):
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                # A client answered early in a round often asks again before it ends: the next
                # rounds follow without a turn of the event loop, a few at most (the file
                # system's requests wait meanwhile).
                for _ in range(ROUNDS_PER_WAKEUP):
                    try:
                        if not self._round():
                            break
                    except Exception:  # a bug: what this round read fails, the daemon goes on
                        log.exception("control socket: a round failed")
                        break
        finally:
            for connection in list(self._connections.values()):
                self._close(connection)
            self._epoll.close()

    def _lines_waiting(self) -> bool:
        """Whether a connection has whole lines to take (and has taken its replies)."""
        return any(not connection.replies for connection in self._backlog)

    def _next_deadline(self) -> float:
        """The first stalled connection's timeout, or the next accept."""
        deadlines = [connection.moved_at + SEND_TIMEOUT for connection in self._waiting]
        if self._accept_at:
            deadlines.append(self._accept_at)
        return min(deadlines, default=math.inf)

    def _round(self) -> bool:
        """One round; whether anything was ready."""
        requests: list[tuple[_Connection, bytes | None]] = []
        touched: dict[_Connection, None] = {}
        for connection in list(self._backlog):
            if not connection.replies:  # a client that does not read is not served
                touched[connection] = None
                self._take_lines(connection, requests)
        accept = False
        ready = self._epoll.poll(0)
        for fd, events in ready:
            if fd == self.listener.fileno():
                accept = True
                continue
            found = self._connections.get(fd)
            if found is None:
                continue  # closed earlier in this round
            connection = found
            touched[connection] = None
            try:
                if connection.replies:  # writable, or hung up: either way, try
                    self._flush(connection)
                elif connection not in self._backlog and \
                        events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._receive(connection, requests)
            except Exception:  # a bug: this connection fails alone
                log.exception("control connection from pid %d failed", connection.peer.pid)
                if not connection.closed:
                    self._close(connection)
        self._answer(requests, touched)
        now = trio.current_time()
        if self._accept_at and now >= self._accept_at:
            self._accept_at = 0.0
            self._epoll.register(self.listener.fileno(), select.EPOLLIN)
        for connection in list(self._waiting):
            if now - connection.moved_at > SEND_TIMEOUT:
                self._close(connection)  # it does not read: nothing it asked is half done
        for connection in touched:
            if not connection.closed:
                self._update(connection)
        if accept:  # last: the connections that ended in this round no longer count
            self._accept()
        return bool(ready) or self._lines_waiting()

    def _accept(self) -> None:
        """A few connections a round: one a client has closed already still counts until a
        round has read it, and a backlog taken all at once would crowd out the live ones."""
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:  # out of descriptors, say: accept later, not in a loop
                log.warning("control socket: cannot accept (%s); again in %s s",
                            error.strerror, ACCEPT_RETRY)
                self._epoll.unregister(self.listener.fileno())
                self._accept_at = trio.current_time() + ACCEPT_RETRY
                return
            sock.setblocking(False)
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, _UCRED.size))
            refusal = self.limits.refusal(uid)
            if refusal is not None:
                try:
                    sock.send(encode(refusal))  # a fresh socket's buffer takes one line
                except OSError:
                    pass
                sock.close()
                continue
            connection = _Connection(sock, Peer(pid, uid, gid))
            self._connections[connection.fd] = connection
            self.limits.connections.take(uid)
            self._epoll.register(connection.fd, select.EPOLLIN)

    def _receive(self, connection: _Connection,
                 requests: list[tuple[_Connection, bytes | None]]) -> None:
        try:
            data = connection.sock.recv(MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)  # reset: the client went away
            return
        if not data:
            connection.reading = False  # the lines it finished are answered all the same
            connection.received.clear()  # a line it never finished is no request
            return
        connection.received += data
        self._take_lines(connection, requests)

    def _take_lines(self, connection: _Connection,
                    requests: list[tuple[_Connection, bytes | None]]) -> None:
        """The next whole line; a connection with more is in the backlog."""
        received = connection.received
        end = received.find(b"\n")
        if 0 <= end <= MAX_LINE:
            requests.append((connection, bytes(received[:end])))
            del received[:end + 1]
            if 0 <= received.find(b"\n") <= MAX_LINE:
                self._backlog[connection] = None
                return
        self._backlog.pop(connection, None)
        if len(received) > MAX_LINE:
            requests.append((connection, _TOO_LONG))
            connection.reading = False
            received.clear()

    def _answer(self, requests: list[tuple[_Connection, bytes | None]],
                touched: dict[_Connection, None]) -> None:
        """Every request of the round, answered in order: the service sees the well-formed
        ones together."""
        replies: list[dict | None] = []
        asked: list[tuple[dict, Peer]] = []
        for connection, line in requests:
            if line is _TOO_LONG:
                replies.append(error_reply(errno.E2BIG, "request too long"))
                continue
            try:
                asked.append((decode(line), connection.peer))
                replies.append(None)
            except ValueError:
                replies.append(error_reply(errno.EINVAL,
                                           "a request is one JSON object on one line"))
        try:
            answers = iter(self.service.answer_all(asked) if asked else ())
        except Exception:  # a bug: these requests fail, the daemon goes on
            log.exception("control requests %r failed", asked)
            failed = error_reply(errno.EIO, "internal error (logged by the daemon)")
            answers = iter([failed] * len(asked))
        # By id (every reply lives until the loop ends): a reply requests share, encoded once.
        encoded: dict[int, bytes] = {}
        for (connection, _), reply in zip(requests, replies):
            answer = reply if reply is not None else next(answers)
            line = encoded.get(id(answer))
            if line is None:
                line = encoded[id(answer)] = encode(answer)
            self._send(connection, line)
            touched[connection] = None

    def _send(self, connection: _Connection, reply: bytes) -> None:
        if connection.closed:
            return  # earlier in this round
        uid = connection.peer.uid
        try:
            self.limits.replies.check(uid, len(reply))
        except OSError as error:
            reply = encode(error_reply(error.errno or errno.EIO, f"{error.strerror}; try again"))
        if not connection.replies:
            try:
                sent = connection.sock.send(reply)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(connection)
                return
            if sent == len(reply):
                return
            reply = reply[sent:]
            connection.moved_at = trio.current_time()
            self._waiting[connection] = None
        connection.replies += reply
        self.limits.replies.take(uid, len(reply))

    def _flush(self, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.replies)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        del connection.replies[:sent]
        self.limits.replies.give(connection.peer.uid, sent)
        connection.moved_at = trio.current_time()
        if not connection.replies:
            del self._waiting[connection]

    def _update(self, connection: _Connection) -> None:
        """Read a connection only when its replies are all taken; close it when it has
        nothing more to say or to take."""
        if connection.replies:
            interest = select.EPOLLOUT
        elif connection in self._backlog:
            interest = 0  # its buffer is taken first (a hang-up is still reported)
        elif connection.reading:
            interest = select.EPOLLIN
        else:
            self._close(connection)
            return
        if interest != connection.interest:
            self._epoll.modify(connection.fd, interest)
            connection.interest = interest

    def _close(self, connection: _Connection) -> None:
        connection.closed = True
        del self._connections[connection.fd]
        self._waiting.pop(connection, None)
        self._backlog.pop(connection, None)
        uid = connection.peer.uid
        self.limits.replies.give(uid, len(connection.replies))
        self.limits.connections.give(uid)
        self._epoll.unregister(connection.fd)
        connection.sock.close()
