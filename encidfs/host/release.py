"""The release of the kernel this runs on, for what the host kernel does differently from one
release to the next (the proc connector's filter, a seccomp listener hanging up)."""

from __future__ import annotations

import os


def kernel_release() -> tuple[int, int]:
    """This kernel's version, as (major, minor); (0, 0) where uname says something else."""
    release = os.uname().release.split(".")
    try:
        return int(release[0]), int(release[1].split("-")[0])
    except (IndexError, ValueError):
        return 0, 0
