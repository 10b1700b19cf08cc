"""The control protocol: one JSON object a line each way, a reply for every request.

Requests (`?`: may be left out, a PID is named in the client's PID namespace):

- {"op": "allocate", "type": T, "count": N?, "pid": P?, "guest": G?}: N IDs (1) for process P
  (the client), for guests G (T's own by default; snp is of type sev_es)
- {"op": "free", "ids": [...], "pid": P?}: IDs that process P (the client) holds
- {"op": "status", "sparse": true?}: the tree and the holders; sparse, without what a new
  cgroup has
- {"op": "cgroup", "pid": TID, "seen_by": P?}: the task's cgroup, TID as process P names it

Replies: {"ok": true, ...} or {"ok": false, "errno": "EBUSY", "error": text, "cgroup": path?,
"controller": name?}.
"""

from __future__ import annotations

import errno
import json

from ..host.runtime import runtime_path

MAX_LINE = 64 * 1024  # a longer request is refused and the connection closed

# The read-only extended attributes of a mount's root: how a client finds its daemon.
CONTROL_XATTR = "user.encidfs.control"  # the control socket's path
OVER_XATTR = "user.encidfs.over"  # of a mount --over DIR: DIR (encidfs exec's cgroup namespace)
PID_XATTR = "user.encidfs.pid"  # the daemon's PID


def default_control_path(mountpoint: str) -> str:
    """Derived from the mountpoint, outside it, in a runtime directory of the mount's owner."""
    return runtime_path(mountpoint, "control", ".sock")


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """A request or reply object; ValueError when the line is not one."""
    try:
        message = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def error_reply(code: int, message: str, cgroup: str | None = None) -> dict:
    reply = {"ok": False, "errno": errno.errorcode.get(code, str(code)), "error": message}
    if cgroup is not None:
        reply["cgroup"] = cgroup
    return reply
