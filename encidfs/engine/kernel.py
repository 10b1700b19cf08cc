"""The misc controller's interface as the kernel releases that changed it have it
(kernel/cgroup/misc.c), so that a mount can show the one of the kernel its users run: software
under test in CI meets the files of RHEL 9's 5.14, Ubuntu 22.04's 5.15 or Debian 12's 6.1, not
only today's.  The encids files are encidfs's own: the same on every kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Version = tuple[int, int]

MISC = (5, 13)  # the controller: misc.capacity at the root, misc.max and misc.current below it
EVENTS = (5, 16)  # misc.events; before, a refusal was a kernel log line, counted nowhere
ROOT_CURRENT = (6, 5)  # misc.current at the root too (CFTYPE_NOT_ON_ROOT before)
PEAK = (6, 11)  # misc.peak and misc.events.local
TDX = (6, 16)  # the tdx resource type (MISC_CG_RES_TDX), with KVM's TDX host support
# KVM's, not misc's: which SEV guests there are, and so which IDs an allocation may take.
SNP = (6, 11)  # SEV-SNP guests (their ASIDs charged to sev_es)
CIPHERTEXT_HIDING = (6, 18)  # kvm_amd's ciphertext_hiding_asids: SNP's own ASIDs
NEWEST = CIPHERTEXT_HIDING

# Resource types misc.c named after its first release: a kernel before has no such type.
TYPES_SINCE = {"tdx": TDX}

_RELEASE = re.compile(r"(\d+)\.(\d+)([.-].*)?")  # 6.1, 6.1.55, or `uname -r`: 6.1.0-18-amd64


@dataclass(frozen=True)
class KernelInterface:
    version: Version = NEWEST

    def __str__(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def misc_events(self) -> bool:
        """misc.events exists, and a refusal counts there."""
        return self.version >= EVENTS

    @property
    def misc_current_on_root(self) -> bool:
        return self.version >= ROOT_CURRENT

    @property
    def misc_peak(self) -> bool:
        return self.version >= PEAK

    @property
    def misc_events_local(self) -> bool:
        """misc.events.local exists, and a refusal counts there."""
        return self.version >= PEAK

    @property
    def snp_guests(self) -> bool:
        return self.version >= SNP

    @property
    def ciphertext_hiding(self) -> bool:
        return self.version >= CIPHERTEXT_HIDING

    def has_type(self, name: str) -> bool:
        """Whether misc knows the resource type.  A name no kernel has (a test's own) is kept
        as on the newest: encidfs takes any type name."""
        return self.version >= TYPES_SINCE.get(name, MISC)


def parse(text: str) -> KernelInterface:
    """MAJOR.MINOR (a patch level or the rest of a `uname -r` release may follow); ValueError,
    for the user, if it is not one or is older than the misc controller."""
    match = _RELEASE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"kernel interface {text!r} is not a kernel version such as 6.1")
    version = (int(match[1]), int(match[2]))
    if version < MISC:
        raise ValueError(f"kernel interface {text} is older than the misc controller "
                         f"(Linux {MISC[0]}.{MISC[1]})")
    return KernelInterface(version)
