"""How many encryption IDs this host has, as its kernel would count them.

In order: the host kernel's own misc.capacity (KVM registers its SEV ASIDs and TDX KeyIDs
there); else, where kvm_amd has SEV enabled, CPUID Fn8000_001F read through /dev/cpu/0/cpuid
and split as sev_hardware_setup() (arch/x86/kvm/svm/sev.c) splits it; else nothing, and the
caller uses its defaults.  TDX has no such second source: KVM's count of KeyIDs reaches user
space only in misc.capacity.  ENCIDFS_HOST_ROOT puts a fake host's /sys and /dev under a
directory (tests).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .mountinfo import cgroup2_mounts

CPUID_SEV_LEAF = 0x8000001F  # AMD: encrypted memory capabilities
CPUID_SEV = 1 << 1  # EAX bit 1: SEV
CPUID_SEV_ES = 1 << 3  # EAX bit 3: SEV-ES
# The encryption-ID types of the misc controller, in the order of the kernel's enum
# misc_res_type, which misc.capacity lists them in.
TYPES = ("sev", "sev_es", "tdx")
# KVM splits one ASID space between these two: a host with either has both, one maybe empty.
SEV_TYPES = ("sev", "sev_es")


@dataclass(frozen=True)
class Detected:
    capacities: dict[str, int]
    first_ids: dict[str, int] | None  # None: each type's IDs follow the previous type's
    source: str  # for the log and `encidfs status`


@dataclass(frozen=True)
class Host:
    """Where the host's answers are read."""

    cgroup_roots: tuple[str, ...]  # roots of cgroup2 hierarchies
    kvm_amd: str  # kvm_amd's module parameters
    cpuid: str  # the cpuid device of one CPU (they agree on this leaf)
    kvm_intel: str  # kvm_intel's module parameters

    @classmethod
    def this_one(cls) -> Host:
        root = os.environ.get("ENCIDFS_HOST_ROOT")
        if root:
            return cls((os.path.join(root, "sys/fs/cgroup"),),
                       os.path.join(root, "sys/module/kvm_amd/parameters"),
                       os.path.join(root, "dev/cpu/0/cpuid"),
                       os.path.join(root, "sys/module/kvm_intel/parameters"))
        return cls(tuple(cgroup2_mounts()), "/sys/module/kvm_amd/parameters",
                   "/dev/cpu/0/cpuid", "/sys/module/kvm_intel/parameters")


def detect(host: Host) -> Detected | None:
    """The host's capacities, or None when no source answers."""
    ranges = _cpuid_ranges(host)
    for root in host.cgroup_roots:
        capacities = _misc_capacity(os.path.join(root, "misc.capacity"))
        if capacities is not None:
            return Detected(capacities, _first_ids(capacities, ranges),
                            f"{root}/misc.capacity")
    if ranges is not None:
        capacities, first = ranges
        return Detected(capacities, first, f"CPUID Fn8000_001F ({host.cpuid}), kvm_amd sev "
                                           f"enabled")
    return None


def tdx_unseen(host: Host, capacities: dict[str, int]) -> str | None:
    """A note for the log and status where kvm_intel has TDX enabled but the capacities have
    no tdx IDs: its count is in the host kernel's misc.capacity alone, which is out of sight
    (a cgroup namespace's root has none) or without the misc controller."""
    if capacities.get("tdx") or not _enabled(host.kvm_intel, "tdx"):
        return None
    return (f"kvm_intel has TDX enabled ({host.kvm_intel}/tdx) but no misc.capacity this "
            "daemon can read lists tdx IDs: the mount has no tdx (give --capacity tdx=N)")


def snp_asids(host: Host) -> int | None:
    """The ASIDs kvm_amd gives SEV-SNP guests alone, as sev_hardware_setup() leaves its 0444
    parameters: None where it runs no SNP guests (sev_snp N, rewritten so where the host
    cannot, or absent: before Linux 6.11), else ciphertext_hiding_asids (Linux 6.18,
    rewritten to the number in effect; absent or 0: SNP and SEV-ES guests share their ASIDs)."""
    if not _enabled(host.kvm_amd, "sev_snp"):
        return None
    try:
        with open(os.path.join(host.kvm_amd, "ciphertext_hiding_asids")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _first_ids(capacities: dict[str, int],
               ranges: tuple[dict[str, int], dict[str, int]] | None) -> dict[str, int]:
    """Where each type's IDs start, misc.capacity having the counts: SEV's where CPUID says
    (if that agrees with the counts), SEV-ES's at 1; TDX's after them, as IDs are unique
    across types (user space cannot see which KeyIDs KVM gives TDs)."""
    first: dict[str, int] = {}
    if "sev" in capacities:
        first = dict(ranges[1]) if ranges else {}
        if not first or first["sev_es"] + capacities["sev_es"] > first["sev"]:
            first = {"sev_es": 1, "sev": capacities["sev_es"] + 1}
    if "tdx" in capacities:
        first["tdx"] = max((first[t] + capacities[t] for t in first), default=1)
    return first


def _misc_capacity(path: str) -> dict[str, int] | None:
    """The encryption-ID types a misc.capacity file lists, if any (the kernel lists a type only
    where it has IDs), in the kernel's order."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        name, _, value = line.partition(" ")
        if name in TYPES and value.isdigit() and int(value):
            found[name] = int(value)
    if not found:
        return None
    if found.keys() & set(SEV_TYPES):
        found = {name: 0 for name in SEV_TYPES} | found
    return {name: found[name] for name in TYPES if name in found}


def _enabled(parameters: str, parameter: str) -> bool:
    """A KVM module's boolean parameter, read from its directory in /sys/module."""
    try:
        with open(os.path.join(parameters, parameter)) as f:
            return f.read().strip() in ("Y", "y", "1")
    except OSError:
        return False


def _cpuid_ranges(host: Host) -> tuple[dict[str, int], dict[str, int]] | None:
    """(capacities, first IDs) as sev_hardware_setup() computes them: SEV guests use ASIDs
    EDX..ECX, SEV-ES guests 1..EDX-1; only where kvm_amd has SEV enabled."""
    if not _enabled(host.kvm_amd, "sev"):
        return None
    try:
        fd = os.open(host.cpuid, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 16, CPUID_SEV_LEAF)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != 16:
        return None
    eax, _, max_sev_asid, min_sev_asid = struct.unpack("<4I", data)
    if not eax & CPUID_SEV or not max_sev_asid or not 1 <= min_sev_asid <= max_sev_asid:
        return None
    sev_es = min_sev_asid - 1 if eax & CPUID_SEV_ES and _enabled(host.kvm_amd, "sev_es") else 0
    return ({"sev": max_sev_asid - min_sev_asid + 1, "sev_es": sev_es},
            {"sev": min_sev_asid, "sev_es": 1})
