"""systemd's notification protocol (sd_notify(3)): a datagram of NAME=VALUE lines to the socket
$NOTIFY_SOCKET names, as a Type=notify service tells it READY=1, STATUS=... and STOPPING=1.
Without the variable (not started by systemd) nothing is sent."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(*assignments: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as error:  # systemd gone or not listening: the service goes on
        log.warning("cannot notify %s: %s", address, error.strerror)
