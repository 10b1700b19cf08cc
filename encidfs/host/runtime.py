"""Where a mount keeps its runtime files (its control socket, its runtime state), named after
the mountpoint: under /run for root; for any other user in a directory of their own, 0700:
$XDG_RUNTIME_DIR when it is set, else /tmp/encidfs-<uid>.  A directory there that someone else
owns, or that others may enter, is refused: it would let them swap the socket."""

from __future__ import annotations

import hashlib
import os
import stat


class RuntimeDirError(Exception):
    """A runtime directory that cannot be trusted or made; the message is for the user."""


def runtime_path(mountpoint: str, kind: str, suffix: str) -> str:
    """The file of `kind` ("control", "state") for this mountpoint, its directory made."""
    mountpoint = os.path.abspath(mountpoint)
    digest = hashlib.sha256(mountpoint.encode()).hexdigest()[:12]
    name = os.path.basename(mountpoint)[:40] or "root"
    return os.path.join(_directory(kind), f"{name}-{digest}{suffix}")


def _directory(kind: str) -> str:
    if os.geteuid() == 0:
        # Others may reach a socket there that its mode and group let them use.
        return _made(f"/run/encidfs-{kind}", 0o755 if kind == "control" else 0o700)
    base = os.environ.get("XDG_RUNTIME_DIR") or _made(f"/tmp/encidfs-{os.geteuid()}", 0o700)
    _check_private(base)
    return _made(os.path.join(base, f"encidfs-{kind}"), 0o700)


def _made(path: str, mode: int) -> str:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as error:
        raise RuntimeDirError(f"cannot make {path}: {error.strerror}") from None
    if os.geteuid() != 0:
        _check_private(path)
    return path


def _check_private(path: str) -> None:
    try:
        info = os.lstat(path)
    except OSError as error:
        raise RuntimeDirError(f"cannot use {path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise RuntimeDirError(f"{path} belongs to uid {info.st_uid}, not to you "
                              f"(uid {os.geteuid()}): remove it, or set XDG_RUNTIME_DIR")
    if info.st_mode & 0o077:
        raise RuntimeDirError(f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):04o});"
                              " it must be 0700")
