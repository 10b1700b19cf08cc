"""The Python client of the control socket.

    from encidfs.client import Client
    with Client.connect(mount="/run/encidfs") as client:
        with client.allocate("sev", count=2) as ids:   # held by this process
            ...                                          # freed on leaving the block
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

from .protocol import CONTROL_XATTR, decode, encode

DEFAULT_TIMEOUT = 5.0  # seconds a request may take before the client gives up on the daemon


class ControlError(OSError):
    """A refused request: errno, message, the type it asked for (an allocation's), and for
    limits the controller and the cgroup whose limit refused."""

    errno: int  # always given, unlike an OSError's
    strerror: str

    def __init__(self, code: int, message: str, cgroup: str | None = None,
                 controller: str | None = None, type: str | None = None) -> None:
        super().__init__(code, message)
        self.cgroup = cgroup
        self.controller = controller
        self.type = type


class Allocation(list):
    """The IDs of one allocation; as a context manager, frees them on exit."""

    def __init__(self, client: Client, type_name: str, ids: list[int], holder: int,
                 cgroup: str, guest: str) -> None:
        super().__init__(ids)
        self.client = client
        self.type = type_name
        self.guest = guest
        self.holder = holder
        self.cgroup = cgroup

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.free(list(self), pid=self.holder)


class Client:
    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Connect to the socket at `path`; every request gives up after `timeout` seconds
        with ETIMEDOUT (a daemon that is stopped, or gone without closing the socket)."""
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connect(path)
        except OSError:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    def _connect(self, path: str) -> None:
        # With a timeout the socket does not block: a full listen backlog is EAGAIN at once.
        self._sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._sock.connect(path)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _timed_out(self.timeout, "to accept the connection") from None
                time.sleep(0.005)

    @classmethod
    def connect(cls, mount: str | None = None, control: str | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Client:
        """By socket path, or by mountpoint (the root's user.encidfs.control names the socket)."""
        if control is None:
            if mount is None:
                raise ValueError("give a mountpoint or a control socket path")
            control = control_path(mount, timeout)
        return cls(control, timeout)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, **request: object) -> dict:
        try:
            self._sock.sendall(encode(request))
            line = self._reader.readline()  # replies have no length limit (status grows)
        except TimeoutError:
            raise _timed_out(self.timeout, "to answer") from None
        if not line.endswith(b"\n"):
            raise ConnectionError("the daemon closed the connection")
        reply = decode(line)
        if not reply.get("ok"):
            code = getattr(errno, str(reply.get("errno")), errno.EIO)
            raise ControlError(code, str(reply.get("error")), reply.get("cgroup"),
                               reply.get("controller"),
                               str(request["type"]) if "type" in request else None)
        return reply

    def allocate(self, type_name: str, count: int = 1, pid: int | None = None,
                 guest: str | None = None) -> Allocation:
        """Allocate IDs charged to the cgroup of `pid` (this process by default), held by it,
        for `guest`s (by default the type's own; "snp" is of type sev_es), from their range."""
        request: dict = {"op": "allocate", "type": type_name, "count": count}
        if pid is not None:
            request["pid"] = pid
        if guest is not None:
            request["guest"] = guest
        reply = self.request(**request)
        return Allocation(self, type_name, reply["ids"], reply["holder"], reply["cgroup"],
                          reply.get("guest", type_name))  # an older daemon's names none

    def free(self, ids: list[int], pid: int | None = None) -> None:
        """Free IDs held by `pid` (this process by default): who may signal it may, and the
        mount's owner."""
        request: dict = {"op": "free", "ids": ids}
        if pid is not None:
            request["pid"] = pid
        self.request(**request)

    def cgroup_of(self, task: int, seen_by: int | None = None) -> str:
        """The cgroup of a task (a PID or TID), from the mount's root; the task is named in
        this process's PID namespace, or in that of process `seen_by` (named in this one)."""
        request: dict = {"op": "cgroup", "pid": task}
        if seen_by is not None:
            request["seen_by"] = seen_by
        return self.request(**request)["cgroup"]

    def status(self, sparse: bool = False) -> dict:
        """`sparse`: each cgroup lists only the types it limits, uses or refused (see
        figures())."""
        return self.request(op="status", sparse=True) if sparse else self.request(op="status")


def figures(status: dict, cgroup: dict, controller: str, type_name: str) -> dict:
    """A resource's figures in a cgroup's entry of a status reply, sparse or not (sparse, a
    resource controller leaves out the types whose figures are a new cgroup's)."""
    return cgroup[controller].get(type_name) or {
        "max": "max", "current": 0, "peak": 0, "events": 0, "events_local": 0,
        "capacity": status["capacities"][type_name]}


def control_path(mount: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The socket the mount's root names.  Asking the mount waits while its daemon is stopped,
    so the question is asked by a thread that is left behind if it does not come back."""
    answer: list[bytes | OSError] = []

    def ask() -> None:
        try:
            answer.append(os.getxattr(mount, CONTROL_XATTR))
        except OSError as error:
            answer.append(error)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    if not answer:
        raise _timed_out(timeout, f"on {mount}")
    if isinstance(answer[0], OSError):
        error = answer[0]
        raise OSError(error.errno, f"{mount} is not an encidfs mount: {error.strerror}")
    return answer[0].decode()


def _timed_out(timeout: float, what: str) -> ControlError:
    return ControlError(errno.ETIMEDOUT, f"the daemon did not answer within {timeout:g} s "
                                         f"(waiting for it {what})")
