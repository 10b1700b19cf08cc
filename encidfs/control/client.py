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

from .protocol import CONTROL_XATTR, decode, encode


class ControlError(OSError):
    """A refused request: errno, message, and for limits the cgroup whose limit refused."""

    def __init__(self, code: int, message: str, cgroup: str | None = None) -> None:
        super().__init__(code, message)
        self.cgroup = cgroup


class Allocation(list):
    """The IDs of one allocation; as a context manager, frees them on exit."""

    def __init__(self, client: Client, type_name: str, ids: list[int], cgroup: str) -> None:
        super().__init__(ids)
        self.client = client
        self.type = type_name
        self.cgroup = cgroup

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.free(list(self))


class Client:
    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    @classmethod
    def connect(cls, mount: str | None = None, control: str | None = None) -> Client:
        """By socket path, or by mountpoint (the root's user.encidfs.control names the socket)."""
        if control is None:
            if mount is None:
                raise ValueError("give a mountpoint or a control socket path")
            control = control_path(mount)
        return cls(control)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, **request: object) -> dict:
        self._sock.sendall(encode(request))
        line = self._reader.readline()  # replies have no length limit (status grows)
        if not line.endswith(b"\n"):
            raise ConnectionError("the daemon closed the connection")
        reply = decode(line)
        if not reply.get("ok"):
            code = getattr(errno, str(reply.get("errno")), errno.EIO)
            raise ControlError(code, str(reply.get("error")), reply.get("cgroup"))
        return reply

    def allocate(self, type_name: str, count: int = 1, pid: int | None = None) -> Allocation:
        """Allocate IDs charged to the cgroup of `pid` (this process by default), held by it."""
        request: dict = {"op": "allocate", "type": type_name, "count": count}
        if pid is not None:
            request["pid"] = pid
        reply = self.request(**request)
        return Allocation(self, type_name, reply["ids"], reply["cgroup"])

    def free(self, ids: list[int]) -> None:
        self.request(op="free", ids=ids)

    def status(self) -> dict:
        return self.request(op="status")


def control_path(mount: str) -> str:
    try:
        return os.getxattr(mount, CONTROL_XATTR).decode()
    except OSError as error:
        raise OSError(error.errno, f"{mount} is not an encidfs mount: {error.strerror}") from None
