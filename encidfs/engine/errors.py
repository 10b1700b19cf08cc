"""Engine errors are plain OSErrors carrying the errno a cgroup file would return."""

import errno
import os


def fail(code: int, detail: str = "") -> OSError:
    message = os.strerror(code) + (f": {detail}" if detail else "")
    return OSError(code, message)


class ChargeRefused(OSError):
    """A charge went over a limit or the capacity; `path` names the cgroup whose limit refused."""

    def __init__(self, resource: str, path: str) -> None:
        super().__init__(errno.EBUSY, f"refused by the limit of {path}")
        self.resource = resource
        self.path = path
