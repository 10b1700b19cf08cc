"""Engine errors are plain OSErrors carrying the errno a cgroup file would return."""

import errno
import os


def fail(code: int, detail: str = "") -> OSError:
    message = os.strerror(code) + (f": {detail}" if detail else "")
    return OSError(code, message)


class Refused(OSError):
    """EBUSY that leaves something behind (an event counted, a watermark raised): journalled
    as a fact, and refused again when replayed."""


class ChargeRefused(Refused):
    """A charge went over a limit or the capacity: `controller` refused it at `path`."""

    strerror: str  # always given, unlike an OSError's

    def __init__(self, controller: str, resource: str, path: str) -> None:
        super().__init__(errno.EBUSY, f"refused by the {controller} limit of {path}")
        self.controller = controller
        self.resource = resource
        self.path = path


class RangeFull(Refused):
    """The charge passed, but the guest's range has no free ID: sev_asid_new() gives the charge
    back and answers EBUSY, and no controller counts an event."""

    def __init__(self, guest: str, ids: range) -> None:
        super().__init__(errno.EBUSY, f"all {len(ids)} IDs of {guest} guests "
                                      f"({ids.start} - {ids.stop - 1}) are in use")
        self.guest = guest
