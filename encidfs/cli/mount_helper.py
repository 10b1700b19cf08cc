"""mount(8) and /etc/fstab: `mount -t fuse.encidfs encidfs MOUNTPOINT -o OPTIONS`.

mount(8) runs /sbin/mount.fuse.encidfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] (scripts/
install.sh links it to the encidfs program); without that link, fuse3's mount.fuse runs
`encidfs SOURCE MOUNTPOINT -o OPTIONS`.  Either way the options become `encidfs mount`'s: each
setting has an -o spelling, the generic options of mount(8) and systemd are accepted and mean
nothing here, and the rest are FUSE options.
"""

from __future__ import annotations

# -o NAME=VALUE -> the `encidfs mount` option it stands for.
SETTINGS = {
    "config": "--config", "state": "--state", "tracking": "--tracking",
    "max_cgroups": "--max-cgroups", "control": "--control", "control_mode": "--control-mode",
    "control_group": "--control-group", "asids": "--asids", "min_sev_asid": "--min-sev-asid",
    "metrics": "--metrics", "over": "--over", "user_share": "--user-share",
    "kernel_interface": "--kernel-interface", "snp_asids": "--snp-asids",
}
# What mount(8), fstab and systemd add for themselves.
GENERIC = {"defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
           "owner", "group"}
GENERIC_PREFIXES = ("x-", "comment=")


class HelperError(ValueError):
    """A mount(8) command line encidfs cannot take; the message is for the user."""


def is_helper_call(program: str, argv: list[str], commands: set[str]) -> bool:
    """Whether encidfs runs as mount(8)'s helper: by the link's name, or as mount.fuse runs
    it (a source where a command would be)."""
    if program.startswith("mount."):
        return True
    return bool(argv) and argv[0] not in commands and not argv[0].startswith("-")


def to_cli(argv: list[str]) -> list[str] | None:
    """`encidfs mount ...` for a helper's command line; None for a fake mount (-f), which
    does nothing."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    words = iter(argv)
    for word in words:
        if word == "-o":
            options += next(words, "").split(",")
        elif word.startswith("-o"):
            options += word[2:].split(",")
        elif word in ("-t", "-N"):
            next(words, None)  # the type (ours), a namespace (mount(8) has entered it)
        elif word.startswith("-") and len(word) > 1:
            if set(word[1:]) - set("sfnv"):
                raise HelperError(f"unknown mount flag {word}")
            fake = fake or "f" in word
        else:
            positional.append(word)
    if len(positional) != 2:
        raise HelperError("usage: mount -t fuse.encidfs encidfs MOUNTPOINT [-o OPTIONS]")
    cli = ["mount", positional[1], "--quiet"]
    fuse = []
    for option in filter(None, options):
        name, sep, value = option.partition("=")
        if option in GENERIC or option.startswith(GENERIC_PREFIXES):
            continue
        if name == "capacity" and sep:
            cli += _capacities(value)
        elif name == "controllers" and sep:
            cli += ["--controllers", value.replace(":", ",")]
        elif name in SETTINGS and sep:
            cli += [SETTINGS[name], value]
        elif option == "debug":
            cli.append("--debug")
        elif name in SETTINGS or name in ("capacity", "controllers"):
            raise HelperError(f"option {name} needs a value ({name}=...)")
        else:
            fuse.append(option)
    if fuse:
        cli += ["-o", ",".join(fuse)]
    return None if fake else cli


def _capacities(value: str) -> list[str]:
    """capacity=auto, or capacity=TYPE:N:TYPE:N... (a comma would end the option)."""
    if value == "auto":
        return ["--capacity", "auto"]
    parts = value.split(":")
    if len(parts) % 2:
        raise HelperError(f"capacity={value} is not TYPE:N[:TYPE:N...]")
    return [arg for name, count in zip(parts[::2], parts[1::2])
            for arg in ("--capacity", f"{name}={count}")]
