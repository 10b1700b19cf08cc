"""Engine errors are plain OSErrors carrying the errno a cgroup file would return."""

import errno
import os


def fail(code: int, detail: str = "") -> OSError:
    message = os.strerror(code) + (f": {detail}" if detail else "")
    return OSError(code, message)


class ChargeRefused(OSError):
    """A charge went over a limit or the capacity: `controller` refused it at `path`."""

    def __init__(self, controller: str, resource: str, path: str) -> None:
        super().__init__(errno.EBUSY, f"refused by the {controller} limit of {path}")
        self.controller = controller
        self.resource = resource
        self.path = path
