"""Resource types and their capacities, from the command line or a TOML file."""

from __future__ import annotations

import grp
import os
import re
import tomllib
from dataclasses import dataclass, field

from ..engine import kernel
from ..host import capacity
from ..host.mountinfo import cgroup2_mount_of
from .controllers import CONTROLLERS

DEFAULT_CAPACITIES = {"sev": 509, "sev_es": 99}
# What encidfs offers by default, in this order; a controller a module registers (--controller-
# module) is offered when named.
CONTROLLER_NAMES = tuple(CONTROLLERS)
# About 1.4 KiB of daemon memory each: 100,000 cgroups, with every other bound at its limit
# (xattrs, connections, replies), keep the daemon well under 1 GiB.
DEFAULT_MAX_CGROUPS = 100_000
DEFAULT_USER_SHARE = 25  # percent
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]*")


class ConfigError(ValueError):
    """A malformed capacity or configuration; the message is for the user."""


@dataclass
class Config:
    capacities: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CAPACITIES))
    first_ids: dict[str, int] | None = None  # None: each type's IDs follow the previous type's
    fuse_options: list[str] = field(default_factory=list)
    control: str | None = None  # the control socket's path; None: derived from the mountpoint
    state: str | None = None  # the state file (and FILE.log); None: a runtime file
    proc_connector: bool = True  # follow forks through the proc connector when permitted
    max_cgroups: int = DEFAULT_MAX_CGROUPS  # below the root, live and dying (mkdir: EAGAIN)
    # Of each resource the outside can make the daemon keep, the percentage one user other
    # than the mount's owner (and root) may (see engine/budget.py).
    user_share: int = DEFAULT_USER_SHARE
    control_mode: int = 0o600  # the control socket's: by default the mount's owner alone
    control_group: int | None = None  # the control socket's group (a GID), if not the owner's
    controllers: list[str] = field(default_factory=lambda: list(CONTROLLER_NAMES))
    metrics: tuple[str, int] | None = None  # where /metrics is served (ADDRESS, PORT)
    # Where the capacities came from, for the log and status (None: not given; the host's).
    capacity_source: str | None = None
    # What the host has that the capacities found leave out, for the log and status.
    capacity_notes: list[str] = field(default_factory=list)
    # A directory of a cgroup v2 hierarchy whose tree the mount shows, the encryption-ID
    # controllers added (None: the standalone tree).
    over: str | None = None
    # The kernel whose misc files and rules the mount shows (engine/kernel.py).
    kernel_interface: kernel.KernelInterface = kernel.KernelInterface()
    # How many of sev_es's IDs SEV-SNP guests have to themselves, as kvm_amd's
    # ciphertext_hiding_asids gives them (0: they share them with SEV-ES guests; None: no SNP
    # guests), and where that came from (None: not given; the host's, or 0).
    snp_asids: int | None = 0
    snp_source: str | None = None

    def layout(self) -> dict:
        """What IDs there are: a state file is only good for the layout it was made with.  The
        SNP guests' own IDs are part of it where they have any (without, it is the layout
        of a release that had no SNP guests, and IDs held by one are SEV-ES's)."""
        layout: dict[str, object] = {"capacities": self.capacities, "first_ids": self.first_ids}
        if self.snp_asids:
            layout["snp_asids"] = self.snp_asids
        return layout

    def use_asids(self, asids: int, min_sev_asid: int) -> None:
        """KVM's split: SEV uses ASIDs min_sev_asid..asids, SEV-ES the ones below min_sev_asid."""
        if asids < 1 or not 1 <= min_sev_asid <= asids:
            raise ConfigError(f"need 1 <= min-sev-asid <= asids, got asids={asids} "
                              f"min-sev-asid={min_sev_asid}")
        self.capacities = {"sev": asids - min_sev_asid + 1, "sev_es": min_sev_asid - 1}
        self.first_ids = {"sev": min_sev_asid, "sev_es": 1}


def parse_capacity(text: str) -> tuple[str, int]:
    """TYPE=N as given to --capacity."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"capacity {text!r} is not TYPE=N")
    return _check_type(name.strip()), _check_count(name, value.strip())


def _check_type(name: object) -> str:
    if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
        raise ConfigError(f"type name {name!r} must be lower-case letters, digits and _")
    return name


def _check_count(name: str, value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise ConfigError(f"capacity of {name!r} must be a whole number from 0 to 2^32-1, "
                          f"got {value!r}")
    return value


def load(path: str | None, capacities: list[str], asids: int | None,
         min_sev_asid: int | None, fuse_options: list[str], control: str | None = None,
         state: str | None = None, max_cgroups: int | None = None,
         control_mode: str | None = None, control_group: str | None = None,
         controllers: str | None = None, over: str | None = None,
         user_share: int | None = None, kernel_interface: str | None = None,
         snp_asids: int | None = None) -> Config:
    """The file first, then the command line over it; without capacities from either (or
    with `--capacity auto`), the host's."""
    config = Config()
    if path is not None:
        _load_file(config, path)
    if (asids is None) != (min_sev_asid is None):
        raise ConfigError("--asids and --min-sev-asid go together")
    if asids is not None and min_sev_asid is not None:
        config.use_asids(asids, min_sev_asid)
        config.capacity_source = "--asids"
    if capacities and capacities != ["auto"]:
        config.capacities = dict(parse_capacity(text) for text in capacities)
        config.first_ids = None
        config.capacity_source = "--capacity"
    if snp_asids is not None:
        config.snp_asids, config.snp_source = _check_snp_asids(snp_asids), "--snp-asids"
    if config.capacity_source is None or capacities == ["auto"]:
        _use_host(config)
    if config.snp_asids:  # capped at all of SEV-ES's, as kvm_amd caps it
        config.snp_asids = min(config.snp_asids, config.capacities.get("sev_es", 0))
    config.fuse_options += fuse_options
    config.control = control or config.control
    config.state = os.path.abspath(state) if state else config.state
    if max_cgroups is not None:
        config.max_cgroups = _check_max_cgroups(max_cgroups)
    if control_mode is not None:
        config.control_mode = _parse_mode(control_mode)
    if control_group is not None:
        config.control_group = _parse_group(control_group)
    if controllers is not None:
        config.controllers = _check_controllers(controllers.split(","))
    if over is not None:
        config.over = over
    if user_share is not None:
        config.user_share = _check_user_share(user_share)
    if kernel_interface is not None:
        config.kernel_interface = _parse_kernel_interface(kernel_interface)
    _snp_as_the_kernel_has_it(config)
    if config.over is not None:
        config.over = _check_over(config.over)
    return config


def _check_over(path: object) -> str:
    """A directory of a mounted cgroup v2 hierarchy, as a real path."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"over must be a directory of a cgroup v2 hierarchy, got {path!r}")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ConfigError(f"over: {path} is not a directory")
    if cgroup2_mount_of(real) is None:
        raise ConfigError(f"over: {path} is not in a cgroup v2 hierarchy")
    return real


def _use_host(config: Config) -> None:
    this_host = capacity.Host.this_one()
    detected = capacity.detect(this_host)
    if detected is None:
        config.capacities, config.first_ids = dict(DEFAULT_CAPACITIES), None
        config.capacity_source = ("defaults: neither the host's misc.capacity nor its CPUID "
                                  "(with SEV enabled in kvm_amd) answered")
    else:
        config.capacities, config.first_ids = detected.capacities, detected.first_ids
        config.capacity_source = detected.source
        if config.snp_source is None:
            config.snp_asids = capacity.snp_asids(this_host)
    unseen = capacity.tdx_unseen(this_host, config.capacities)
    config.capacity_notes = [unseen] if unseen else []


def _snp_as_the_kernel_has_it(config: Config) -> None:
    """SNP guests as KVM of the chosen kernel has them: none before 6.11, sharing SEV-ES's IDs
    before ciphertext hiding (6.18).  A split asked for that the kernel cannot make is an
    error; one found on the host is the host kernel's, not the chosen one's."""
    chosen = config.kernel_interface
    if config.snp_asids is None or (chosen.ciphertext_hiding or not config.snp_asids) \
            and chosen.snp_guests:
        return
    if config.snp_source is not None and config.snp_asids:
        need = kernel.CIPHERTEXT_HIDING if chosen.snp_guests else kernel.SNP
        raise ConfigError(f"snp_asids ({config.snp_source}) needs the interface of Linux "
                          f"{need[0]}.{need[1]} or later, not {chosen}")
    config.snp_asids = 0 if chosen.snp_guests else None


def _check_controllers(names: object) -> list[str]:
    """Names of registered controllers, each once; offered in the order given."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names) or not set(names) <= set(CONTROLLERS):
        raise ConfigError(f"controllers must be some of {', '.join(CONTROLLERS)}, each "
                          f"once, got {names!r}")
    return list(names)


def _parse_mode(text: object) -> int:
    """A socket mode in octal (0660): read and write bits only, as connect(2) needs write."""
    if isinstance(text, str) and re.fullmatch(r"0?[0-7]{3}", text) and not int(text, 8) & 0o111:
        return int(text, 8)
    raise ConfigError(f"control mode {text!r} must be octal permission bits such as 0660, "
                      "without execute bits")


def _parse_group(name: object) -> int:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"control group {name!r} must be a group name or number")
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"control group {name!r}: no such group") from None


def _parse_kernel_interface(text: object) -> kernel.KernelInterface:
    # A TOML number would lose the version's zeros: 6.10 reads as 6.1.
    if not isinstance(text, str):
        raise ConfigError(f"kernel_interface must be a version in a string, such as \"6.1\", "
                          f"got {text!r}")
    try:
        return kernel.parse(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_snp_asids(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise ConfigError(f"snp_asids must be a whole number from 0 to 2^32-1, got {value!r}")
    return value


def _check_max_cgroups(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise ConfigError(f"max_cgroups must be a whole number from 0 to 2^31-1, got {value!r}")
    return value


def _check_user_share(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
        raise ConfigError(f"user_share must be a percentage from 1 to 100, got {value!r}")
    return value


def _load_file(config: Config, path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    unknown = set(data) - {"capacity", "asids", "min_sev_asid", "fuse_options", "control",
                           "state", "max_cgroups", "control_mode", "control_group",
                           "controllers", "over", "user_share", "kernel_interface",
                           "snp_asids"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    if "capacity" in data:
        table = data["capacity"]
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"{path}: [capacity] must map type names to counts")
        config.capacities = {_check_type(k): _check_count(k, v) for k, v in table.items()}
        config.capacity_source = path
    if "asids" in data or "min_sev_asid" in data:
        if "capacity" in data:
            raise ConfigError(f"{path}: give either [capacity] or asids/min_sev_asid")
        asids, minimum = data.get("asids"), data.get("min_sev_asid")
        if not isinstance(asids, int) or not isinstance(minimum, int):
            raise ConfigError(f"{path}: asids and min_sev_asid must both be given as numbers")
        config.use_asids(asids, minimum)
        config.capacity_source = path
    options = data.get("fuse_options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ConfigError(f"{path}: fuse_options must be a list of strings")
    config.fuse_options = list(options)
    control = data.get("control")
    if control is not None and not isinstance(control, str):
        raise ConfigError(f"{path}: control must be a path")
    config.control = control
    state = data.get("state")
    if state is not None and not isinstance(state, str):
        raise ConfigError(f"{path}: state must be a path")
    config.state = state
    if "max_cgroups" in data:
        config.max_cgroups = _check_max_cgroups(data["max_cgroups"])
    if "control_mode" in data:
        config.control_mode = _parse_mode(data["control_mode"])
    if "control_group" in data:
        config.control_group = _parse_group(data["control_group"])
    if "controllers" in data:
        config.controllers = _check_controllers(data["controllers"])
    if "over" in data:
        config.over = data["over"]
    if "user_share" in data:
        config.user_share = _check_user_share(data["user_share"])
    if "kernel_interface" in data:
        config.kernel_interface = _parse_kernel_interface(data["kernel_interface"])
    if "snp_asids" in data:
        config.snp_asids, config.snp_source = _check_snp_asids(data["snp_asids"]), path
