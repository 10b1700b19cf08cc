"""Hostile input: arbitrary bytes written to every file of every kind of cgroup, and malformed,
truncated, oversized and abandoned requests on the control socket.

The oracle for the files is a model of the kernel, written from lib/kstrtox.c, lib/string.c and
the cgroup write handlers, independently of encidfs/files/parse.py (which it is also compared
with directly).  For every write it predicts the exact outcome from the state read before it:
a failed write must change nothing at all (every readable file of every cgroup and every
directory listing is read before and after), and a successful one must have the kernel's
meaning (the file reads back what the model says, and nothing else changed unless the file's
meaning is to change more).

Safety: cgroup.procs and cgroup.threads are written only with PIDs of the sleeps this module
starts, or with numbers above pid_max (no process can have them); `0` (the writer: this test
process's thread) only to cgroup.threads, and only where the model says it moves nothing
(outside the root's threaded subtree).  So the test process stays in the root,
which has no cgroup.freeze and no cgroup.kill, and only the sleeps are ever in the cgroups that
cgroup.freeze and cgroup.kill are written to.  The control socket is asked to act only for this
process, a sleep of the test's own, or PIDs above pid_max.

HOSTILE_EXAMPLES=N (examples per file, default 25) and HOSTILE_REQUESTS=N (control requests,
default 300) in the environment make longer runs.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mountutil import DEADLINE, keyed, outcome, read, wait_until, write, write_result

from encidfs.client import Client
from encidfs.files import parse as daemon_parse

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())
INT_MAX = 2**31 - 1
U64_MAX = 2**64 - 1
MAX_LINE = 64 * 1024
CAPACITY = {"sev": 509, "sev_es": 99}  # the default instance's


# -- the kernel's parsers, modelled on lib/kstrtox.c and lib/ctype.c ---------------------------

class KernelError(Exception):
    """A negative errno from a kernel parser; `name` is the errno's name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_KERNEL_SPACE = frozenset(b"\t\n\v\f\r \xa0")  # isspace(): _S in lib/ctype.c
_XDIGIT = frozenset(b"0123456789abcdefABCDEF")


def k_strstrip(s: bytes) -> bytes:
    """strstrip(): trailing isspace() first, then skip_spaces()."""
    end = len(s)
    while end > 0 and s[end - 1] in _KERNEL_SPACE:
        end -= 1
    start = 0
    while start < end and s[start] in _KERNEL_SPACE:
        start += 1
    return s[start:end]


def _char(s: bytes, i: int) -> int:
    """s[i] of a C string: 0 (its NUL) past the end."""
    return s[i] if i < len(s) else 0


def _fixup_radix(s: bytes, base: int) -> tuple[bytes, int]:
    """_parse_integer_fixup_radix()."""
    if base == 0:
        if _char(s, 0) == ord("0"):
            base = 16 if (_char(s, 1) | 0x20) == ord("x") and _char(s, 2) in _XDIGIT else 8
        else:
            base = 10
    if base == 16 and _char(s, 0) == ord("0") and (_char(s, 1) | 0x20) == ord("x"):
        s = s[2:]
    return s, base


def _parse_integer(s: bytes, base: int) -> tuple[int, int, bool]:
    """_parse_integer_limit(): value (mod 2^64), digits consumed, overflow seen."""
    res = count = 0
    overflow = False
    for c in s:
        lc = c | 0x20
        if ord("0") <= c <= ord("9"):
            val = c - ord("0")
        elif ord("a") <= lc <= ord("f"):
            val = lc - ord("a") + 10
        else:
            break
        if val >= base:
            break
        if res >= 2**60 and res > (U64_MAX - val) // base:
            overflow = True
        res = (res * base + val) & U64_MAX
        count += 1
    return res, count, overflow


def _k_kstrtoull(s: bytes, base: int) -> int:
    s, base = _fixup_radix(s, base)
    res, count, overflow = _parse_integer(s, base)
    if overflow:
        raise KernelError("ERANGE")
    if count == 0:
        raise KernelError("EINVAL")
    rest = s[count:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        raise KernelError("EINVAL")
    return res


def k_kstrtoull(s: bytes, base: int = 0) -> int:
    if s[:1] == b"+":
        s = s[1:]
    return _k_kstrtoull(s, base)


def k_kstrtoint(s: bytes, base: int = 0) -> int:
    """kstrtoint(): kstrtoll(), then `tmp != (int)tmp` is ERANGE."""
    if s[:1] == b"-":
        tmp = _k_kstrtoull(s[1:], base)
        negated = -tmp & U64_MAX
        if 0 < negated < 2**63:  # (long long)-tmp > 0
            raise KernelError("ERANGE")
        value = -tmp
    else:
        tmp = k_kstrtoull(s, base)
        if tmp >= 2**63:  # (long long)tmp < 0
            raise KernelError("ERANGE")
        value = tmp
    if not -(2**31) <= value < 2**31:
        raise KernelError("ERANGE")
    return value


def handler_text(data: bytes) -> bytes:
    """kernfs hands the handler a NUL-terminated copy: the text ends at the first NUL."""
    return data.split(b"\0", 1)[0]


def _daemon_result(parse: Callable[[], int | bytes]) -> int | bytes | str:
    try:
        return parse()
    except OSError as error:
        return errno.errorcode[error.errno]


def _model_result(parse: Callable[[], int | bytes]) -> int | bytes | str:
    try:
        return parse()
    except KernelError as error:
        return error.name


# -- what gets written ---------------------------------------------------------------------------

SPACES = [b" ", b"\t", b"\n", b"\v", b"\f", b"\r", b"\xa0"]
BOUNDARIES = [0, 1, 2, 7, 8, 16, INT_MAX - 1, INT_MAX, 2**31, 2**32, 2**63 - 1, 2**63, 2**63 + 1,
              U64_MAX - 1, U64_MAX, 2**64, 2**64 + 1, 10**20, PID_MAX, PID_MAX + 1]
WORDS = [b"max", b"MAX", b"max\n", b"maxx", b"ma", b"max max", b"threaded", b"domain",
         b"threaded\n", b"+encids", b"-encids", b"encids", b"+", b"-", b"+foo", b"+ENCIDS",
         b"+encids,", b"*encids", b"0", b"1", b"-1", b"-0", b"+0", b"0x", b"0X1f", b"010", b"08",
         b"0x1", b"01", b"2", b"--1", b"+-1", b"-+1", b"1.5", b"1e3", b"\n", b"\n\n", b"", b" "]
TOKENS = [b"+encids", b"-encids", b"+", b"-", b"encids", b"+ENCIDS", b"+foo", b"", b"*encids",
          b"+encids\t", b"+encids\xa0", b"-encidsx", b"++encids"]
SEPARATORS = [b" ", b"  ", b"\t", b"\n", b"\xa0", b""]
TAILS = [b"", b"\n", b"\0", b"\0junk", b"\0\xff\xfe 12", b"\n\0", b" \0max"]
SIZES = [4095, 4096, 4096, 4097, 5000, 70000, 200000]


def _render(value: int, style: str) -> bytes:
    return {"dec": f"{value}", "hex": f"0x{value:x}", "HEX": f"0X{value:X}",
            "oct": f"0{value:o}"}[style].encode()


_styles = st.sampled_from(["dec", "hex", "HEX", "oct"])
_ws = st.lists(st.sampled_from(SPACES), max_size=4).map(b"".join)

integer_text = st.builds(
    lambda sign, value, style: sign + _render(value, style),
    st.sampled_from([b"", b"", b"+", b"-"]),
    st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 2**70)), _styles)
digit_soup = st.text("0123456789abcdefxX+- ", max_size=30).map(str.encode)
long_digits = st.builds(lambda digits, n: digits * n,
                        st.sampled_from([b"9", b"1", b"0", b"7f", b"0x"]), st.integers(10, 3000))
many_tokens = st.lists(st.tuples(st.sampled_from(TOKENS), st.sampled_from(SEPARATORS)),
                       max_size=60).map(lambda pairs: b"".join(t + s for t, s in pairs))
non_utf8 = st.binary(max_size=40).map(lambda b: bytes(x | 0x80 for x in b))
core_text = st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), integer_text,
                      integer_text.map(bytes),
                      digit_soup, long_digits, many_tokens, st.binary(max_size=80), non_utf8)


@dataclass(frozen=True)
class PidText:
    """A PID to be rendered when the write happens: a sleep's (whose PID is only known then),
    the writer (0), or one above pid_max."""

    who: str  # "busy" / "plain/leaf" (a sleep's home), "zero", or "above"
    above: int
    sign: bytes
    style: str


pid_text = st.builds(PidText, st.sampled_from(["busy", "plain/leaf", "zero", "above"]),
                     st.integers(PID_MAX + 1, 2**32), st.sampled_from([b"", b"", b"+", b"-"]),
                     _styles)


@dataclass(frozen=True)
class Data:
    """What one write sends: before + core + after + tail, then padded to `size` bytes with
    `fill` on the left (0) or on the right (1), if given."""

    before: bytes
    core: bytes | PidText
    after: bytes
    tail: bytes
    size: int | None = None
    fill: bytes = b" "
    side: int = 0

    def render(self, pids: dict[str, int]) -> bytes:
        core = self.core
        if isinstance(core, PidText):
            pid = {"zero": 0, "above": core.above}[core.who] if core.who in ("zero", "above") \
                else pids[core.who]
            core = core.sign + _render(pid, core.style)
        data = self.before + core + self.after + self.tail
        if self.size is not None and len(data) < self.size:
            pad = self.fill * (self.size - len(data))
            data = pad + data if self.side == 0 else data + pad
        return data


def _data(core: st.SearchStrategy) -> st.SearchStrategy[Data]:
    padded = st.builds(Data, _ws, core, _ws, st.sampled_from(TAILS), st.sampled_from(SIZES),
                       st.sampled_from([*SPACES, b"0", b"\0", b"x"]), st.integers(0, 1))
    plain = st.builds(Data, _ws, core, _ws, st.sampled_from(TAILS))
    return st.one_of(st.just(Data(b"", b"", b"", b"")),
                     *[plain.map(lambda data: data) for _ in range(5)], padded)


ALL_CGROUPS = ["", "enc", "ctl", "ctl/child", "plain", "plain/leaf", "busy"]
NOT_ROOT = [rel for rel in ALL_CGROUPS if rel]
SLEEP_HOMES = {"busy": "sev", "plain/leaf": "sev_es"}  # where each sleep lives, what it holds
WRITABLE = ["cgroup.subtree_control", "cgroup.procs", "cgroup.threads", "cgroup.max.depth",
            "cgroup.max.descendants", "cgroup.type", "cgroup.freeze", "cgroup.kill",
            "encids.sev.max", "encids.sev_es.max"]
READ_ONLY = ["cgroup.controllers", "cgroup.stat", "cgroup.stat.local", "cgroup.events",
             "encids.sev.current", "encids.sev.events", "encids.sev.stat",
             "encids.sev_es.current", "encids.sev_es.stat"]
# What the kernel may answer a write of each file with (README's tables); ENOENT: the file is
# not there (encids files where the parent does not enable encids).
ALLOWED = {
    "cgroup.subtree_control": {"EINVAL", "ENOENT", "EBUSY", "EEXIST", "EOPNOTSUPP"},
    "cgroup.procs": {"EINVAL", "ESRCH", "EBUSY", "EOPNOTSUPP", "EACCES"},
    "cgroup.threads": {"EINVAL", "ESRCH", "EBUSY", "EOPNOTSUPP", "EACCES"},
    "cgroup.max.depth": {"EINVAL", "ERANGE"},
    "cgroup.max.descendants": {"EINVAL", "ERANGE"},
    "cgroup.type": {"EINVAL", "EOPNOTSUPP"},
    "cgroup.freeze": {"EINVAL", "ERANGE"},
    "cgroup.kill": {"EINVAL", "ERANGE", "EOPNOTSUPP"},
    "encids.sev.max": {"EINVAL", "ERANGE"},
    "encids.sev_es.max": {"EINVAL", "ERANGE"},
}
_COMMON_ERRNOS = {"E2BIG", "ENOENT", "ENODEV", "EINVAL"}

_offsets = st.one_of(st.none(), st.integers(0, 9),
                     st.sampled_from([4095, 4096, 4097, 2**31 - 1, 2**32 + 1, 2**40 + 3]),
                     st.integers(0, 2**44))
_targets = st.one_of(*[st.tuples(st.sampled_from(ALL_CGROUPS), st.sampled_from(WRITABLE))
                       for _ in range(6)],
                     st.tuples(st.sampled_from(ALL_CGROUPS), st.sampled_from(READ_ONLY)))
_pid_targets = st.tuples(st.sampled_from(ALL_CGROUPS),
                         st.sampled_from(["cgroup.procs", "cgroup.threads"]))
_general_write = st.tuples(_targets, _data(core_text), _offsets)
hostile_write = st.one_of(  # (one_of takes one strategy once: the maps make copies)
    _general_write, _general_write.map(tuple), _general_write.map(tuple),
    st.tuples(_pid_targets, _data(st.one_of(pid_text, pid_text.map(lambda p: p), core_text)),
              _offsets))


# -- the model of the cgroup write handlers -------------------------------------------------------

Snapshot = dict[str, object]  # "/rel/" -> directory listing; "/rel/name" -> content or "!ERRNO"


def _key(rel: str, name: str = "") -> str:
    return f"/{rel}/{name}" if rel else f"/{name}"


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def _children(snap: Snapshot, rel: str) -> list[str]:
    listing = snap[_key(rel)]
    assert isinstance(listing, tuple)
    return [f"{rel}/{name[:-1]}" if rel else name[:-1] for name in listing if name.endswith("/")]


def _subtree(snap: Snapshot, rel: str) -> list[str]:
    found = [rel]
    for child in _children(snap, rel):
        found += _subtree(snap, child)
    return found


def _threads(snap: Snapshot, rel: str) -> list[int]:
    """The sleeps' TIDs in rel, which are their PIDs (each has one thread): where they are,
    threaded cgroups included (whose cgroup.procs cannot be read)."""
    return [int(line) for line in str(snap[_key(rel, "cgroup.threads")]).splitlines()]


def _enables(snap: Snapshot, rel: str) -> bool:
    return snap[_key(rel, "cgroup.subtree_control")] == "encids\n"


# Threaded subtrees (cgroup.c): the state's types, read from the snapshot, decide the next
# write's outcome; _model_types() computes every type afresh after a cgroup turns threaded.

def _threaded(snap: Snapshot, rel: str) -> bool:
    return bool(rel) and snap[_key(rel, "cgroup.type")] == "threaded\n"


def _dom(snap: Snapshot, rel: str) -> str:
    while _threaded(snap, rel):
        rel = _parent(rel)
    return rel


def _populated(snap: Snapshot, rel: str) -> bool:
    return keyed(str(snap[_key(rel, "cgroup.events")]))["populated"] == 1


def _is_thread_root(snap: Snapshot, rel: str) -> bool:
    return not _threaded(snap, rel) and any(_threaded(snap, c) for c in _children(snap, rel))


def _is_valid_domain(snap: Snapshot, rel: str) -> bool:
    return not rel or str(snap[_key(rel, "cgroup.type")]) not in ("threaded\n",
                                                                 "domain invalid\n")


def _can_be_thread_root(snap: Snapshot, rel: str) -> bool:
    if not rel:
        return True
    if _threaded(snap, rel) or snap[_key(rel, "cgroup.subtree_control")]:
        return False
    return not any(_populated(snap, c) and not _threaded(snap, c)
                   for c in _children(snap, rel))


def _model_types(snap: Snapshot, threaded: set[str]) -> dict[str, str]:
    """cgroup_type_show() for every non-root cgroup, from which ones are threaded."""
    def thread_root(rel: str) -> bool:
        return rel not in threaded and any(c in threaded for c in _children(snap, rel))

    def valid(rel: str) -> bool:
        while rel:
            rel = _parent(rel)
            if rel in threaded or (rel and thread_root(rel)):
                return False
        return True

    return {rel: "threaded\n" if rel in threaded else "domain invalid\n" if not valid(rel)
            else "domain threaded\n" if thread_root(rel) else "domain\n"
            for rel in _all_cgroups(snap) if rel}


@dataclass
class Expect:
    result: str  # "OK" or the errno name
    readback: str | None = None  # what the written file reads afterwards
    # what a success changes: "nothing"; "target" (the file alone); "subtree" (the children's
    # files too); "move" (a process); "settle" (freezing or killing: asynchronous effects)
    effect: str = "nothing"
    moved: tuple[int, str, str] | None = None  # (pid, from, to)
    killed: tuple[int, ...] = ()
    skip: bool = False  # a PID that names some process of the system: not written


def expect(snap: Snapshot, rel: str, name: str, data: bytes, sleeps: dict[int, str]) -> Expect:
    """The kernel's answer to writing `data` to rel/name in the state `snap`.  `sleeps` maps
    this module's sleep PIDs to their names."""
    if name not in snap[_key(rel)]:  # type: ignore[operator]
        return Expect("ENOENT")
    if not data:
        return Expect("OK")  # write(2) of nothing: no command
    if len(data) > 4096:
        return Expect("E2BIG")
    text = handler_text(data)
    try:
        return _expect_handler(snap, rel, name, text, sleeps)
    except KernelError as error:
        return Expect(error.name)


def _limit_text(value: int, maximum: int) -> str:
    return "max\n" if value == maximum else f"{value}\n"


def _expect_handler(snap: Snapshot, rel: str, name: str, text: bytes,
                    sleeps: dict[int, str]) -> Expect:
    stripped = k_strstrip(text)
    if name in ("cgroup.max.depth", "cgroup.max.descendants"):
        value = INT_MAX if stripped == b"max" else k_kstrtoint(stripped)
        if value < 0:
            return Expect("ERANGE")
        return Expect("OK", _limit_text(value, INT_MAX), "target")
    if name.startswith("encids.") and name.endswith(".max"):
        value = U64_MAX if stripped == b"max" else k_kstrtoull(stripped)
        return Expect("OK", _limit_text(value, U64_MAX), "target")
    if name == "cgroup.type":  # cgroup_type_write(), cgroup_enable_threaded()
        if stripped != b"threaded":
            return Expect("EINVAL")
        if _threaded(snap, rel):
            return Expect("OK", "threaded\n")
        if _populated(snap, rel) or snap[_key(rel, "cgroup.subtree_control")]:
            return Expect("EOPNOTSUPP")
        dom = _dom(snap, _parent(rel))
        if not _is_valid_domain(snap, dom) or not _can_be_thread_root(snap, dom):
            return Expect("EOPNOTSUPP")
        return Expect("OK", "threaded\n", "threaded")
    if name == "cgroup.freeze":
        value = k_kstrtoint(stripped)
        if value not in (0, 1):
            return Expect("ERANGE")
        readback = f"{value}\n"
        same = snap[_key(rel, name)] == readback
        return Expect("OK", readback, "nothing" if same else "settle")
    if name == "cgroup.kill":
        if k_kstrtoint(stripped) != 1:
            return Expect("ERANGE")
        if _threaded(snap, rel):
            return Expect("EOPNOTSUPP")
        victims = tuple(pid for cg in _subtree(snap, rel) for pid in _threads(snap, cg))
        return Expect("OK", effect="settle" if victims else "nothing", killed=victims)
    if name == "cgroup.subtree_control":
        return _expect_subtree_control(snap, rel, stripped)
    if name in ("cgroup.procs", "cgroup.threads"):
        return _expect_pid_write(snap, rel, name, stripped, sleeps)
    return Expect("EINVAL")  # a read-only file: cgroup_file_write() has no handler


def _expect_subtree_control(snap: Snapshot, rel: str, stripped: bytes) -> Expect:
    """cgroup_subtree_control_write()."""
    enable = disable = False
    for token in stripped.split(b" "):  # strsep(&buf, " ")
        if not token:
            continue
        if token[1:] != b"encids" or token[:1] not in (b"+", b"-"):
            return Expect("EINVAL")
        enable, disable = token[:1] == b"+", token[:1] == b"-"
    enabled = _enables(snap, rel)
    enable, disable = enable and not enabled, disable and enabled
    # A threaded cgroup is offered no domain controller (cgroup_control()).
    if enable and rel and (not _enables(snap, _parent(rel)) or _threaded(snap, rel)):
        return Expect("ENOENT")
    if disable and any(_enables(snap, child) for child in _children(snap, rel)):
        return Expect("EBUSY")
    if not enable and not disable:
        return Expect("OK", "encids\n" if enabled else "")
    if enable:  # cgroup_vet_subtree_control_enable()
        if not _is_valid_domain(snap, _dom(snap, rel)):
            return Expect("EOPNOTSUPP")
        if rel and (_is_thread_root(snap, rel) or _threaded(snap, rel)):
            return Expect("EOPNOTSUPP")
        if rel and _threads(snap, rel):
            return Expect("EBUSY")  # no internal processes
    return Expect("OK", "encids\n" if enable else "", "subtree")


def _expect_pid_write(snap: Snapshot, rel: str, name: str, stripped: bytes,
                      sleeps: dict[int, str]) -> Expect:
    """__cgroup_procs_write(): EINVAL, ESRCH, then cgroup_attach_permissions()."""
    try:
        value = k_kstrtoint(stripped)
    except KernelError:
        return Expect("EINVAL")
    if value < 0:
        return Expect("EINVAL")
    if value in sleeps:
        pid = value
        where = next(cg for cg in _all_cgroups(snap) if pid in _threads(snap, cg))
    elif value == 0 and name == "cgroup.threads":
        pid, where = os.getpid(), ""  # the writer's thread, in the root
    elif value > PID_MAX:
        return Expect("ESRCH")
    else:
        return Expect("SKIP", skip=True)  # the writer, or maybe some process of the system
    # cgroup_migrate_vet_dst()
    if not _is_valid_domain(snap, _dom(snap, rel)):
        return Expect("EOPNOTSUPP")
    if not (_can_be_thread_root(snap, rel) or _threaded(snap, rel)) \
            and snap[_key(rel, "cgroup.subtree_control")]:
        return Expect("EBUSY")
    if name == "cgroup.threads" and _dom(snap, where) != _dom(snap, rel):
        return Expect("EOPNOTSUPP")  # threads move within their threaded subtree
    if where == rel:
        return Expect("OK")
    if value == 0:
        return Expect("SKIP", skip=True)  # it would move the test's own thread
    return Expect("OK", effect="move", moved=(pid, where, rel))


def _all_cgroups(snap: Snapshot) -> list[str]:
    return _subtree(snap, "")


# -- a module-wide instance with every kind of cgroup -----------------------------------------

def daemon_log(mountpoint: Path) -> Path:
    """The daemon's log: its stderr, found from its PID (the root's user.encidfs.pid)."""
    pid = int(os.getxattr(mountpoint, "user.encidfs.pid"))
    return Path(os.readlink(f"/proc/{pid}/fd/2"))


def assert_no_traceback(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, f"the daemon logged an internal error:\n{text}"


class Tree:
    """The shared instance's cgroups, the sleeps in them, and the state they are reset to:

    /enc          its parent (the root) enables encids; nothing below
    /ctl          enables encids for /ctl/child
    /plain        enables nothing: /plain/leaf has no encids files
    /plain/leaf   holds a sleep with one sev_es ID (charged to /plain, the nearest css)
    /busy         holds a sleep with one sev ID
    """

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.log = daemon_log(mnt)
        self.sleeps: dict[str, subprocess.Popen] = {}
        self._fds: dict[Path, int] = {}
        self.dirty = False
        self.current: Snapshot = {}
        for rel in NOT_ROOT:
            (mnt / rel).mkdir()
        self.baseline: Snapshot = {}
        self.reset()
        self.baseline = self.canonical(self.current)

    # -- state ----------------------------------------------------------------------------------

    def pids(self) -> dict[int, str]:
        return {process.pid: home for home, process in self.sleeps.items()}

    def snapshot(self) -> Snapshot:
        """Every directory listing and every file's content (or its read errno).  The root's
        cgroup.procs and cgroup.threads list every process of the system: only the sleeps
        are kept of them."""
        snap: Snapshot = {}
        mine = {str(pid) for pid in self.pids()}

        def walk(rel: str) -> None:
            directory = self.mnt / rel
            with os.scandir(directory) as entries:
                listing = sorted(entry.name + "/" if entry.is_dir() else entry.name
                                 for entry in entries)
            snap[_key(rel)] = tuple(listing)
            for name in listing:
                if name.endswith("/"):
                    walk(f"{rel}/{name[:-1]}" if rel else name[:-1])
                    continue
                try:
                    content = self._read(directory / name)
                except OSError as error:
                    content = "!" + errno.errorcode[error.errno]
                if name == "cgroup.stat.local":  # a clock while freezing: its format only
                    assert content.startswith("frozen_usec ") and content[12:-1].isdigit()
                    content = "frozen_usec N\n"
                if not rel and name in ("cgroup.procs", "cgroup.threads"):
                    content = "".join(f"{line}\n" for line in content.splitlines()
                                      if line in mine)
                snap[_key(rel, name)] = content

        walk("")
        return snap

    def _read(self, path: Path) -> str:
        """The file's content from a descriptor kept open (a read at offset 0 renders afresh,
        as a new open would; one request instead of four keeps the snapshots cheap)."""
        fd = self._fds.get(path)
        if fd is not None:
            try:
                return os.pread(fd, 1 << 20, 0).decode()
            except OSError as error:
                if error.errno != errno.ENODEV:
                    raise
                os.close(self._fds.pop(path))  # its file went away and came back: a new one
        fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, 1 << 20, 0).decode()

    def canonical(self, snap: Snapshot) -> Snapshot:
        """The snapshot with each sleep's PID replaced by its home's name."""
        names = {str(pid): f"<{home}>" for pid, home in self.pids().items()}
        return {key: "".join(names.get(line, line) + "\n" for line in value.splitlines())
                if key.endswith(("/cgroup.procs", "/cgroup.threads")) else value
                for key, value in snap.items()}

    # -- the sleeps -------------------------------------------------------------------------------

    def _forget(self, pid: int) -> None:
        """Wait until the daemon has seen pid exit: in no cgroup, holding nothing."""
        with Client.connect(mount=str(self.mnt)) as client:
            def gone() -> bool:
                status = client.status()
                return (all(pid not in cg["procs"] for cg in status["cgroups"])
                        and all(h["pid"] != pid for h in status["holders"]))
            wait_until(gone, f"the daemon to see process {pid} exit")

    def stop(self, home: str) -> None:
        process = self.sleeps.pop(home, None)
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=DEADLINE)
        self._forget(process.pid)

    def _start(self, home: str) -> None:
        process = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        self.sleeps[home] = process
        write(self.mnt / home / "cgroup.procs", str(process.pid))
        with Client.connect(mount=str(self.mnt)) as client:
            client.allocate(SLEEP_HOMES[home], 1, pid=process.pid)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for home in list(self.sleeps):
            process = self.sleeps.pop(home)
            if process.poll() is None:
                process.kill()
            process.wait(timeout=DEADLINE)

    # -- back to the baseline ---------------------------------------------------------------------

    def _settings(self) -> None:
        for rel in sorted(NOT_ROOT, key=lambda r: -r.count("/")):
            write(self.mnt / rel / "cgroup.freeze", "0")
        for rel in ["ctl/child", "plain/leaf", "enc", "busy", "plain", "ctl"]:
            write(self.mnt / rel / "cgroup.subtree_control", "-encids")
        for home in SLEEP_HOMES:
            process = self.sleeps.get(home)
            if process is None or process.poll() is not None:
                self.stop(home)
                self._start(home)
            else:
                write(self.mnt / home / "cgroup.procs", str(process.pid))
        write(self.mnt / "cgroup.subtree_control", "+encids")
        write(self.mnt / "ctl" / "cgroup.subtree_control", "+encids")
        for rel in ALL_CGROUPS:
            write(self.mnt / rel / "cgroup.max.depth", "max")
            write(self.mnt / rel / "cgroup.max.descendants", "max")
            for type_name in CAPACITY:
                if rel and rel != "plain/leaf":
                    write(self.mnt / rel / f"encids.{type_name}.max", "max")

    def _rebuild(self) -> None:
        """No cgroup turns back from threaded: with the sleeps gone (and their IDs with them),
        every cgroup is made again."""
        for home in list(self.sleeps):
            self.stop(home)
        for rel in sorted(NOT_ROOT, key=lambda r: -r.count("/")):
            (self.mnt / rel).rmdir()
        for limit in ("cgroup.max.depth", "cgroup.max.descendants"):  # a write may have set
            write(self.mnt / limit, "max")
        for rel in NOT_ROOT:
            (self.mnt / rel).mkdir()

    def reset(self) -> None:
        """Settings, memberships and charges as at the start.  Charges that went with a css
        taken offline (encids disabled above their cgroup) are only undone by their holder's
        exit: if the state still differs, the sleeps start afresh."""
        if any(read(self.mnt / rel / "cgroup.type") != "domain\n" for rel in NOT_ROOT):
            self._rebuild()
        self._settings()
        self.current = self.snapshot()
        if self.baseline and self.canonical(self.current) != self.baseline:
            for home in list(self.sleeps):
                self.stop(home)
            self._settings()
            self.current = self.snapshot()
            assert_same(self.baseline, self.canonical(self.current), "after a reset")
        self.dirty = False


def assert_same(before: Snapshot, after: Snapshot, what: str, ignore: str | None = None) -> None:
    changed = {key: (before.get(key), after.get(key)) for key in before.keys() | after.keys()
               if key != ignore and before.get(key) != after.get(key)}
    assert not changed, f"{what}, these changed (before, after): {changed}"


@pytest.fixture(scope="module")
def tree(shared_mnt: Path) -> Iterator[Tree]:
    built = Tree(shared_mnt)
    try:
        yield built
    finally:
        built.close()


# -- 1. files -------------------------------------------------------------------------------------

def _apply(tree: Tree, rel: str, name: str, data: bytes, offset: int | None,
           before: Snapshot) -> tuple[Snapshot, str]:
    """One write, checked against the model.  Returns the state after it and what happened:
    "skipped" (not written), "failed", "applied" (synchronously: the snapshot is the state) or
    "unsettled" (freezing or killing under way: the sequence ends)."""
    model = expect(before, rel, name, data, tree.pids())
    if model.skip:
        return before, "skipped"
    path = tree.mnt / rel / name
    result = write_result(path, data, offset)
    where = f"write of {data[:100]!r}{'...' if len(data) > 100 else ''} ({len(data)} bytes) " \
            f"at offset {offset} to /{rel}/{name}"
    assert result != "EIO", f"{where}: EIO (an internal error)"
    assert result == "OK" or result in ALLOWED.get(name, set()) | _COMMON_ERRNOS, \
        f"{where}: {result}, not an errno the kernel uses for this file"
    assert result == model.result, f"{where}: {result}, the kernel gives {model.result}"
    RESULTS[(name, result)] += 1
    if result != "OK":
        after = tree.snapshot()
        assert_same(before, after, f"{where} failed with {result}, yet")
        return after, "failed"
    if model.effect == "settle":
        if model.readback is not None:
            assert read(path) == model.readback, where
        if model.readback == "1\n":  # frozen once every process below has stopped
            events = tree.mnt / rel / "cgroup.events"
            wait_until(lambda: keyed(read(events))["frozen"] == 1, f"{where} to freeze")
        for pid in model.killed:
            process = next(p for p in tree.sleeps.values() if p.pid == pid)
            wait_until(lambda p=process: p.poll() is not None, f"{where} to kill {pid}")
        return before, "unsettled"
    after = tree.snapshot()
    key = _key(rel, name)
    if model.readback is not None:
        assert after[key] == model.readback, f"{where}: reads back {after[key]!r}"
    if model.effect == "nothing":
        assert_same(before, after, f"{where} means nothing, yet")
    elif model.effect == "target":
        assert_same(before, after, f"{where} changes that file alone, yet", ignore=key)
    elif model.effect == "subtree":
        enabled = model.readback == "encids\n"
        for child in _children(after, rel):
            has_files = "encids.sev.max" in after[_key(child)]  # type: ignore[operator]
            expected = enabled and not _threaded(after, child)
            assert has_files == expected, f"{where}: /{child} has encids files: {has_files}"
    elif model.effect == "threaded":
        threaded = {cg for cg in _all_cgroups(before) if _threaded(before, cg)} | {rel}
        types = {cg: after[_key(cg, "cgroup.type")] for cg in _all_cgroups(after) if cg}
        assert types == _model_types(after, threaded), f"{where}: the types are {types}"
        assert "encids.sev.max" not in after[_key(rel)], f"{where}: encids files stayed"
        # Besides the types, only its own files and the counts of csses above it change.
        changed = {key for key in before.keys() | after.keys()
                   if before.get(key) != after.get(key)}
        assert all(key.endswith(("/cgroup.type", "/cgroup.stat"))
                   or key.startswith(_key(rel)) for key in changed), \
            f"{where}: these changed: {sorted(changed)}"
    elif model.effect == "move":
        assert model.moved is not None
        pid, src, dst = model.moved
        assert pid in _threads(after, dst), f"{where}: {pid} is not in /{dst}"
        assert pid not in _threads(after, src), f"{where}: {pid} is still in /{src}"
        if dst:
            assert keyed(str(after[_key(dst, "cgroup.events")]))["populated"] == 1
    return after, "applied"


# What the writes did (file, result) and how the sequences went: summarised by the last test
# of the files (shown with -s).
RESULTS: collections.Counter[tuple[str, str]] = collections.Counter()
OUTCOMES: collections.Counter[str] = collections.Counter()


_numbers = st.one_of(integer_text, st.sampled_from(WORDS), core_text)
_SUBTREE_WORDS = [b"+encids", b"-encids", b"+encids -encids", b"-encids +encids",
                  b"-encids -encids", b"+encids  +encids", b"+encids\t"]
FAMILY_TEXT = {  # text that means something to the file, and anything else
    "cgroup.procs": st.one_of(pid_text, pid_text.map(lambda p: p), core_text),
    "cgroup.threads": st.one_of(pid_text, pid_text.map(lambda p: p), core_text),
    "cgroup.subtree_control": st.one_of(st.sampled_from(_SUBTREE_WORDS), many_tokens, core_text),
    "cgroup.type": st.one_of(st.sampled_from([b"threaded", b"domain", b"domain threaded",
                                              b"Threaded", b"threadedx"]), core_text),
}


def _first_write(family: str) -> st.SearchStrategy:
    """A write to one file (or to any read-only one) of any cgroup."""
    names = READ_ONLY if family == "read-only" else [family]
    core = FAMILY_TEXT.get(family, _numbers)
    return st.tuples(st.tuples(st.sampled_from(ALL_CGROUPS), st.sampled_from(names)),
                     _data(core), _offsets)


def _run_sequence(tree: Tree, writes: list) -> None:
    if tree.dirty:
        tree.reset()
    tree.dirty = True  # until this example ends cleanly
    before = tree.current
    for (rel, name), data, offset in writes:
        pids = {home: process.pid for home, process in tree.sleeps.items()}
        before, what = _apply(tree, rel, name, data.render(pids), offset, before)
        OUTCOMES[what] += 1
        if what == "unsettled":
            return  # the next example resets
    if before is not tree.current and tree.canonical(before) != tree.baseline:
        tree.reset()
    else:
        tree.current = before
        tree.dirty = False


# Each example is a short sequence of writes: the first to the file of the test, the others
# to any file, each from the state the one before left.  Writes that succeeded are undone
# before the next example.  The examples' count keeps the module well under a minute: a state
# snapshot reads ~110 files.  HOSTILE_EXAMPLES=N in the environment runs N per file instead.
@pytest.mark.parametrize("family", [*WRITABLE, "read-only"])
def test_hostile_writes_to_every_file_of_every_kind_of_cgroup(tree, family):
    @settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 25)), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(first=_first_write(family), rest=st.lists(hostile_write, max_size=2))
    def run(first, rest):
        _run_sequence(tree, [first, *rest])

    run()
    assert_no_traceback(tree.log)


def test_hostile_writes_in_and_around_a_threaded_subtree(tree):
    """Sequences that start by turning a cgroup threaded (where the kernel lets it), so that
    the writes after it meet thread roots, threaded and domain invalid cgroups."""
    @settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 25)), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(first=st.tuples(st.tuples(st.sampled_from(NOT_ROOT), st.just("cgroup.type")),
                           st.just(Data(b"", b"threaded", b"", b""))),
           rest=st.lists(hostile_write, min_size=1, max_size=3))
    def run(first, rest):
        _run_sequence(tree, [(*first, None), *rest])

    run()
    assert_no_traceback(tree.log)


def test_writes_at_the_size_limit(tree):
    """4096 bytes is one command whatever they hold; 4097 is E2BIG; at any offset."""
    if tree.dirty:
        tree.reset()
    enc = tree.mnt / "enc"
    for offset in (None, 1, 4095, 2**33 + 1):
        assert write_result(enc / "cgroup.max.depth", b" " * 4095 + b"7", offset) == "OK"
        assert read(enc / "cgroup.max.depth") == "7\n"
        assert write_result(enc / "cgroup.max.depth", b"5" + b"\0" * 4095, offset) == "OK"
        assert read(enc / "cgroup.max.depth") == "5\n"
        assert write_result(enc / "cgroup.max.depth", b" " * 4096 + b"9", offset) == "E2BIG"
        assert write_result(enc / "encids.sev.max", b"\xa0" * 4095 + b"3", offset) == "OK"
        assert read(enc / "encids.sev.max") == "3\n"
        assert write_result(enc / "encids.sev.max", b"\xa0" * 4096 + b"4", offset) == "E2BIG"
        assert write_result(enc / "cgroup.subtree_control",
                            b"+encids -encids " * 256, offset) == "OK"
        assert write_result(enc / "cgroup.subtree_control",
                            b"+encids -encids " * 256 + b"+encids", offset) == "E2BIG"
        assert read(enc / "encids.sev.max") == "3\n" and read(enc / "cgroup.max.depth") == "5\n"
    tree.reset()


def test_a_descriptor_of_a_controller_file_stays_dead_once_the_file_is_gone(tree):
    """Disabling encids in a parent removes the children's encids files; enabling it again
    creates new ones (kernfs nodes of their own, with fresh limits).  A descriptor opened on
    the old file answers ENODEV for good, as one of a removed cgroup does: it must not write
    the new file's limit, nor read it."""
    if tree.dirty:
        tree.reset()
    tree.dirty = True
    ctl, child = tree.mnt / "ctl", tree.mnt / "ctl" / "child"
    fd = os.open(child / "encids.sev.max", os.O_RDWR)
    try:
        assert outcome(lambda: os.write(fd, b"5")) == "OK"
        write(ctl / "cgroup.subtree_control", "-encids")
        assert outcome(lambda: os.write(fd, b"6")) == "ENODEV"
        write(ctl / "cgroup.subtree_control", "+encids")
        assert read(child / "encids.sev.max") == "max\n"  # a new file, a fresh limit
        wrote = outcome(lambda: os.write(fd, b"7"))
        limit = read(child / "encids.sev.max")
        reread = outcome(lambda: os.pread(fd, 100, 0))
        assert (wrote, limit, reread) == ("ENODEV", "max\n", "ENODEV"), \
            "(write, new file's limit, read) through the removed file's descriptor"
    finally:
        os.close(fd)
    tree.reset()


def test_subtree_control_refuses_for_its_own_reasons_before_a_name_collision(mnt, procs):
    """Enabling a controller creates its files in every child; a grandchild cgroup named like
    one of them makes that fail (EEXIST), but only once the checks of
    cgroup_subtree_control_write() have passed: a parent that does not offer the controller is
    ENOENT, processes in the cgroup are EBUSY, whatever the names below."""
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "plain" / "clash" / "kid" / "encids.sev.max").mkdir(parents=True)
    clash = mnt / "plain" / "clash"
    not_offered = write_result(clash / "cgroup.subtree_control", "+encids")
    assert read(clash / "cgroup.subtree_control") == ""

    (mnt / "busy" / "kid" / "encids.sev_es.current").mkdir(parents=True)
    sleeper = procs.sleep()
    write(mnt / "busy" / "cgroup.procs", str(sleeper.pid))
    with_processes = write_result(mnt / "busy" / "cgroup.subtree_control", "+encids")
    assert read(mnt / "busy" / "cgroup.subtree_control") == ""
    assert (not_offered, with_processes) == ("ENOENT", "EBUSY")

    # With nothing else in the way, the collision itself: EEXIST, and nothing enabled.
    write(mnt / "cgroup.procs", str(sleeper.pid))
    assert write_result(mnt / "busy" / "cgroup.subtree_control", "+encids") == "EEXIST"
    assert read(mnt / "busy" / "cgroup.subtree_control") == ""
    assert sorted(os.listdir(mnt / "busy" / "kid")) == sorted(
        ["encids.sev_es.current", *[name for name in os.listdir(mnt / "plain")
                                    if name.startswith("cgroup.")]])


def test_the_daemon_still_answers_after_the_hostile_writes(tree):
    if tree.dirty:
        tree.reset()
    probe = tree.mnt / "probe"
    probe.mkdir()
    assert read(probe / "encids.sev.max") == "max\n"
    probe.rmdir()
    with Client.connect(mount=str(tree.mnt)) as client:
        with client.allocate("sev", 1) as ids:
            assert len(ids) == 1
        assert len(client.status()["holders"]) == 2  # the two sleeps
    assert keyed(read(tree.mnt / "encids.sev.stat"))["used"] == 1
    assert_no_traceback(tree.log)
    print(f"\nhostile writes: {dict(OUTCOMES)}")
    files = sorted({name for name, _ in RESULTS})
    for name in files:
        print(f"  {name}: " + ", ".join(f"{result} {count}" for (n, result), count
                                         in sorted(RESULTS.items()) if n == name))


# The model itself, against the daemon's parsers (no mount): the same answer for any bytes.

_parser_input = st.one_of(st.binary(max_size=40), core_text,
                          st.builds(lambda a, c, b: a + c + b, _ws, integer_text, _ws))


@settings(max_examples=2000, deadline=None)
@given(text=_parser_input)
@pytest.mark.slow
def test_the_daemons_parsers_agree_with_the_kernel_model(text):
    text = handler_text(text)
    assert daemon_parse.written_text(text + b"\0x") == text
    assert daemon_parse.strstrip(text) == k_strstrip(text)
    # Base 0 only: every handler uses it (the daemon's parsers do not strip a "0x" given base
    # 16 explicitly, which no caller does).
    assert _daemon_result(lambda: daemon_parse.kstrtoull(text, 0)) == \
        _model_result(lambda: k_kstrtoull(text, 0)), text
    assert _daemon_result(lambda: daemon_parse.kstrtoint(text, 0)) == \
        _model_result(lambda: k_kstrtoint(text, 0)), text


# -- 2. the control socket ------------------------------------------------------------------------

def control_path(mnt: Path) -> str:
    return os.getxattr(mnt, "user.encidfs.control").decode()


class Raw:
    """A control connection spoken to in raw bytes."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        # A socket with a timeout connects without blocking: with the listen backlog full (a
        # burst of connections the daemon has not accepted yet) that is EAGAIN; try again.
        wait_until(lambda: self._connect(path), "the daemon to accept a connection")
        self.reader = self.sock.makefile("rb")

    def _connect(self, path: str) -> bool:
        try:
            self.sock.connect(path)
        except BlockingIOError:
            return False
        return True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply_line(self) -> bytes:
        try:
            return self.reader.readline()
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def used(mnt: Path, type_name: str = "sev") -> int:
    return keyed(read(mnt / f"encids.{type_name}.stat"))["used"]


def charges(mnt: Path) -> dict[str, int]:
    return {type_name: used(mnt, type_name) for type_name in CAPACITY}


def pidfd_targets(pid: int) -> list[str]:
    """What each pidfd of the daemon refers to, as fdinfo tells (Pid:, -1 once reaped)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    targets += [line.split()[1] for line in f if line.startswith("Pid:")]
        except FileNotFoundError:
            pass  # closed meanwhile
    return targets


def daemon_fds(pid: int) -> collections.Counter[str]:
    """The daemon's open files, by what they are (sockets by inode, pidfds counted)."""
    found: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[os.readlink(f"/proc/{pid}/fd/{fd}")] += 1
        except FileNotFoundError:
            pass  # closed meanwhile
    return found


_json_scalar = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-2**70, 2**70),
                         st.text(max_size=12))
json_value = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
_not_an_int = json_value.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))


@dataclass(frozen=True)
class Own:
    """This test process's PID, filled in when the request is sent."""


_counts = st.one_of(st.sampled_from([0, 1, 2, 98, 99, 100, 509, 510, 2**64, -1, True, False,
                                     1.0, "1", None]), st.integers(-3, 600), _not_an_int)
_pids = st.one_of(st.sampled_from([Own(), Own(), 0, -1, True, 1.0, "1", None, 2**70, 2**31 - 1,
                                   2**64]), st.integers(PID_MAX + 1, 2**63), _not_an_int)
_types = st.one_of(st.sampled_from(["sev", "sev_es", "sev", "sev_es", "SEV", "sev\u0000", "",
                                    "sev ", "\ud800"]), json_value)
_ids = st.one_of(st.lists(st.sampled_from([1, 2, 3, 510]), min_size=1, unique=True),
                 st.lists(st.sampled_from([1, 2, 3, 510, 0, 4, 509, 511, 2**64]), max_size=5),
                 st.lists(st.integers(-3, 700), max_size=5), json_value)
_requests = st.one_of(
    # anything at all under "op" and the other keys
    st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(["allocate", "free", "status", "ALLOCATE", "",
                                          "allocate ", "free\u0000"]), json_value)},
        optional={"type": _types, "count": _counts, "pid": _pids, "ids": _ids,
                  "extra": json_value}),
    # the real ops, with arguments of every type
    st.fixed_dictionaries({"op": st.just("allocate"), "type": _types},
                          optional={"count": _counts, "pid": _pids, "extra": json_value}),
    st.fixed_dictionaries({"op": st.just("allocate"), "type": st.sampled_from(["sev", "sev_es"]),
                           "count": st.integers(-1, 600)}, optional={"pid": _pids}),
    st.fixed_dictionaries({"op": st.just("free"), "ids": _ids},
                          optional={"pid": _pids, "extra": json_value}),
    st.fixed_dictionaries({"op": st.just("free")}, optional={"ids": json_value}),
    st.fixed_dictionaries({"op": st.just("status")}, optional={"extra": json_value}),
)


def _encode_request(request: dict, ascii_only: bool) -> bytes:
    request = {key: os.getpid() if isinstance(value, Own) else value
               for key, value in request.items()}
    text = json.dumps(request, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8


_encoded = st.builds(_encode_request, _requests, st.booleans())
request_lines = st.one_of(
    _encoded, _encoded.map(bytes), _encoded.map(bytes),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=120),
    st.sampled_from([b"", b"{", b"}", b"null", b"[]", b"{}", b'{"op"}', b'{"op":1}',
                     b'{"op": "status"', b'\xef\xbb\xbf{"op": "status"}', b"NaN",
                     b'{"op": "status"} {"op": "status"}', b'{"op": "status"}\r',
                     b'\x00{"op": "status"}', b'{"op": "allocate", "type": "sev", "count": 1e3}',
                     b'{"op": "allocate", "type": "sev", "count": 1' + b"0" * 5000 + b"}"]),
).map(lambda line: line.replace(b"\n", b""))


@dataclass
class Holding:
    """IDs a sleep holds throughout the control test, so that a random free can hit them."""

    pid: int
    ids: dict[str, list[int]]

    def type_of(self, id_: int) -> str:
        return next(t for t, held in self.ids.items() if id_ in held)

    def all(self) -> set[int]:
        return {id_ for held in self.ids.values() for id_ in held}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def expected_reply(line: bytes, holding: Holding) -> str:
    """"OK", the errno name the service answers `line` with, or "SKIP" for a request that
    would act for some process of the system.  Only the holding's IDs are allocated when a
    line is sent: every other allocation is freed at once, and a freed holding taken again."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return "EINVAL"
    if not isinstance(request, dict):
        return "EINVAL"
    op = request.get("op")
    if not isinstance(op, str) or op not in ("status", "allocate", "free"):
        return "EINVAL"
    if op == "status":
        return "OK"
    if op == "free":
        ids, holder = request.get("ids"), request.get("pid", os.getpid())
        if not isinstance(ids, list) or not ids or not all(_whole(i) for i in ids) \
                or not _whole(holder):
            return "EINVAL"
        # Root is the mount's owner: it may name any holder, but the IDs must be the holder's.
        if holder != holding.pid or not set(ids) <= holding.all() or len(set(ids)) != len(ids):
            return "EINVAL"  # all or nothing
        return "OK"
    type_name, count = request.get("type"), request.get("count", 1)
    pid = request.get("pid", os.getpid())
    if not isinstance(type_name, str) or not _whole(count) or not _whole(pid) or pid <= 0:
        return "EINVAL"
    if pid > PID_MAX:
        return "ESRCH"
    if pid != os.getpid():
        return "SKIP"
    if count < 1 or type_name not in CAPACITY:
        return "EINVAL"
    free = CAPACITY[type_name] - len(holding.ids.get(type_name, []))
    return "EBUSY" if count > free else "OK"


def check_reply(line: bytes, reply_line: bytes, expected: str, client: Client,
                holding: Holding) -> None:
    """One reply line: an error object with an errno name, or a success.  IDs a success
    allocated are freed at once; holding IDs it freed are taken again (the lowest free IDs:
    the same ones)."""
    what = f"request {line[:120]!r} ({len(line)} bytes)"
    assert reply_line.endswith(b"\n"), f"{what}: no reply line, got {reply_line[:200]!r}"
    reply = json.loads(reply_line)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), f"{what}: {reply!r}"
    if reply["ok"]:
        request = json.loads(line)
        if request["op"] == "allocate":
            client.free(reply["ids"])
            assert len(reply["ids"]) == request.get("count", 1), f"{what}: {reply!r}"
            assert not set(reply["ids"]) & holding.all(), f"{what}: held IDs handed out again"
            assert reply["holder"] == os.getpid() and reply["cgroup"] == "/", f"{what}: {reply!r}"
        elif request["op"] == "free":
            assert reply["ids"] == request["ids"], f"{what}: {reply!r}"
            for type_name in CAPACITY:
                freed = sorted(i for i in request["ids"] if holding.type_of(i) == type_name)
                if freed:
                    again = client.allocate(type_name, len(freed), pid=holding.pid)
                    assert sorted(again) == freed, f"{what}: took {list(again)} back"
    else:
        assert isinstance(reply.get("error"), str), f"{what}: {reply!r}"
        name = reply.get("errno")
        assert name in errno.errorcode.values() and name != "EIO", f"{what}: {reply!r}"
    result = "OK" if reply["ok"] else reply["errno"]
    assert result == expected, f"{what}: {result} ({reply!r}), expected {expected}"


@dataclass(frozen=True)
class Line:
    line: bytes
    shared: bool  # on the connection the examples share, or a fresh one


@dataclass(frozen=True)
class Truncated:
    data: bytes  # sent without a newline, then the connection closes
    half_close: bool  # shutdown(SHUT_WR) and wait for the daemon to close, or just close


@dataclass(frozen=True)
class Oversized:
    size: int
    newline: bool
    valid: bool  # a status request padded with spaces, or garbage
    shared: bool

    def data(self) -> bytes:
        if self.valid:
            head = b'{"op": "status", "pad": "'
            line = head + b" " * max(0, self.size - len(head) - 2) + b'"}'
        else:
            line = b"x" * self.size
        return line + (b"\n" if self.newline else b"")


_lines = st.builds(Line, request_lines, st.booleans())
control_actions = st.one_of(
    _lines, _lines.map(lambda line: line), _lines.map(lambda line: line),
    _lines.map(lambda line: line), _lines.map(lambda line: line),
    st.builds(Truncated, st.one_of(request_lines, st.sampled_from(
        [b'{"op": "allocate", "type": "sev"}', b'{"op": "allocate", "type": "sev", "count": 5',
         b'{"op": "allocate"'])).filter(bool), st.booleans()),
    st.builds(Oversized, st.one_of(st.sampled_from([MAX_LINE - 1, MAX_LINE, MAX_LINE + 1]),
                                   st.integers(MAX_LINE + 1, 3 * MAX_LINE)),
              st.booleans(), st.booleans(), st.booleans()),
)


class Connections:
    """The examples' shared connection, reopened when the daemon closes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.shared: Raw | None = None

    def get(self, shared: bool) -> Raw:
        if not shared:
            return Raw(self.path)
        if self.shared is None:
            self.shared = Raw(self.path)
        return self.shared

    def done(self, connection: Raw, closed: bool) -> None:
        if closed or connection is not self.shared:
            connection.close()
        if closed and connection is self.shared:
            self.shared = None


def _send(connection: Raw, data: bytes) -> None:
    try:
        connection.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending an over-long line: the reply is queued


REPLIES: collections.Counter[str] = collections.Counter()  # what the requests got, shown with -s


def _op(line: bytes) -> str:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return "(not JSON)"
    op = request.get("op") if isinstance(request, dict) else None
    return op if op in ("allocate", "free", "status") else "(other)"


def _run_action(action: object, connections: Connections, client: Client,
                holding: Holding) -> None:
    if isinstance(action, Line):
        expected = expected_reply(action.line, holding)
        REPLIES[f"{_op(action.line)} {expected}"] += 1
        if expected == "SKIP":
            return
        connection = connections.get(action.shared)
        connection.send(action.line + b"\n")
        check_reply(action.line, connection.reply_line(), expected, client, holding)
        connections.done(connection, closed=False)
    elif isinstance(action, Truncated):
        connection = connections.get(shared=False)
        connection.send(action.data)
        if action.half_close:
            connection.sock.shutdown(socket.SHUT_WR)
            rest = connection.reply_line()
            assert rest == b"", f"a reply to the unfinished {action.data[:100]!r}: {rest!r}"
        connections.done(connection, closed=True)
    else:
        assert isinstance(action, Oversized)
        data = action.data()
        if action.size <= MAX_LINE and not action.newline:
            return  # an unfinished line of legal length: Truncated covers it
        connection = connections.get(action.shared)
        _send(connection, data)
        reply_line = connection.reply_line()
        if action.size <= MAX_LINE:
            check_reply(data[:-1], reply_line, "OK" if action.valid else "EINVAL", client,
                        holding)
            connections.done(connection, closed=False)
            return
        assert reply_line.endswith(b"\n"), f"no E2BIG reply to {action}: {reply_line!r}"
        reply = json.loads(reply_line)
        assert reply["ok"] is False and reply["errno"] == "E2BIG", f"{action}: {reply!r}"
        assert connection.reply_line() == b"", f"the connection stays open after {action}"
        connections.done(connection, closed=True)


@pytest.mark.slow
def test_hostile_requests_on_the_control_socket(daemon):
    mnt = daemon.path
    connections = Connections(control_path(mnt))
    # Held by this process, so that a random free (which names this process by default) can
    # hit them.
    me = os.getpid()
    with Client.connect(mount=str(mnt)) as client:
        holding = Holding(me, {"sev": list(client.allocate("sev", 3)),
                               "sev_es": list(client.allocate("sev_es"))})
    assert holding.ids == {"sev": [1, 2, 3], "sev_es": [510]}
    baseline = charges(mnt)
    counts = {"Line": 0, "Truncated": 0, "Oversized": 0}

    @settings(max_examples=int(os.environ.get("HOSTILE_REQUESTS", 300)), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(action=control_actions)
    def run(action):
        counts[type(action).__name__] += 1
        with Client.connect(mount=str(mnt)) as client:
            _run_action(action, connections, client, holding)
        assert daemon.process.poll() is None, "the daemon died"
        assert charges(mnt) == baseline, f"charges changed after {action}"

    try:
        run()
    finally:
        if connections.shared is not None:
            connections.shared.close()
    assert all(counts.values()), counts
    print(f"\ncontrol actions: {counts}; replies to lines: {dict(REPLIES)}")
    # A normal client still allocates and frees; only the holding is left.
    with Client.connect(mount=str(mnt)) as client:
        with client.allocate("sev", 3) as ids:
            assert ids == [4, 5, 6]
            assert used(mnt) == baseline["sev"] + 3
        assert [(h["pid"], h["ids"]) for h in client.status()["holders"]] == [
            (me, [1, 2, 3]), (me, [510])]
        assert charges(mnt) == baseline
        client.free(sorted(holding.all()))
    assert charges(mnt) == {"sev": 0, "sev_es": 0}
    assert daemon.process.poll() is None
    assert_no_traceback(daemon.log_path)


def _within(seconds: float, action: Callable[[], object], what: str) -> object:
    """Run action in a thread; fail if it does not finish within `seconds`."""
    result: list[object] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(action())
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    worker = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{what} took over {seconds} s: blocked by the slow client?"
    if errors:
        raise errors[0]
    assert time.monotonic() - started <= seconds
    return result[0]


def _allocate_and_free(mnt: Path) -> list[int]:
    with Client.connect(mount=str(mnt)) as client:
        with client.allocate("sev", 2) as ids:
            held = list(ids)
        return held


@pytest.mark.parametrize("stall", [
    b'{"op": "allocate", "ty',
    b'{"op": "allocate", "type": "sev", "count": 1}',  # all but the newline
    b" " * (MAX_LINE - 10),
], ids=["half-request", "no-newline", "almost-64KiB"])
def test_a_stalled_client_does_not_block_others(daemon, stall):
    mnt = daemon.path
    slow = Raw(control_path(mnt))
    try:
        slow.send(stall)
        for _ in range(3):
            assert _within(5.0, lambda: _allocate_and_free(mnt),
                           "another client's allocate+free") == [1, 2]
        assert used(mnt) == 0
        # The slow client finishes its request at last and is answered.
        if stall.startswith(b"{"):
            slow.send(b'pe": "sev"}\n' if stall.endswith(b"ty") else b"\n")
            reply = json.loads(slow.reply_line())
            assert reply["ok"] and reply["ids"] == [1]
            with Client.connect(mount=str(mnt)) as client:
                client.free(reply["ids"])
        else:
            slow.send(b"\n")
            assert json.loads(slow.reply_line())["errno"] == "EINVAL"
    finally:
        slow.close()
    assert used(mnt) == 0
    assert_no_traceback(daemon.log_path)


def test_a_client_that_never_reads_its_replies_does_not_block_others(daemon):
    mnt = daemon.path
    flood = Raw(control_path(mnt))
    flood.sock.setblocking(False)
    sent = 0
    request = b'{"op": "status"}\n' * 64
    try:
        # Fill the socket buffers both ways: the daemon's writer for this client blocks.
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                sent += flood.sock.send(request)
            except BlockingIOError:
                break
        assert sent > 0
        assert _within(5.0, lambda: _allocate_and_free(mnt), "allocate+free") == [1, 2]
    finally:
        flood.close()
    assert _within(5.0, lambda: _allocate_and_free(mnt), "allocate+free") == [1, 2]
    assert used(mnt) == 0
    assert_no_traceback(daemon.log_path)


def test_connections_closed_abruptly_mid_request_leave_nothing_charged(daemon, procs):
    mnt = daemon.path
    path = control_path(mnt)
    holder = procs.sleep()
    with Client.connect(control=path) as client:
        client.free(client.allocate("sev", pid=holder.pid), pid=holder.pid)  # now watched
        base_fds = daemon_fds(daemon.process.pid)
        request = json.dumps({"op": "allocate", "type": "sev", "pid": holder.pid}).encode()
        complete = 0
        for round_ in range(3):
            opened = [Raw(path) for _ in range(60)]
            for i, connection in enumerate(opened):
                cut = (i * 7 + round_) % (len(request) + 2)
                if cut == len(request) + 1:
                    connection.send(request + b"\n")  # whole, but the reply is never read
                    complete += 1
                elif cut:
                    connection.send(request[:cut])
                if i % 3 == 0:
                    connection.sock.shutdown(socket.SHUT_RDWR)
            for connection in reversed(opened):
                connection.close()
            # Closed, so the next round's 60 are within this user's 64 connections.
            try:
                wait_until(lambda: not daemon_fds(daemon.process.pid) - base_fds,
                           "the daemon to close the abandoned connections")
            except AssertionError as error:
                left = daemon_fds(daemon.process.pid) - base_fds
                raise AssertionError(f"{error}: still open: {dict(left)}; the pidfds' processes:"
                                     f" {pidfd_targets(daemon.process.pid)}, the holder "
                                     f"{holder.pid}") from None
        # Unfinished requests charge nothing; each whole one charged its one ID, held by the
        # holder (not by the connection) until it exits.
        wait_until(lambda: used(mnt) == complete, f"{complete} IDs charged")
        holders = client.status()["holders"]
        assert [h["pid"] for h in holders] == ([holder.pid] if complete else [])
        assert _within(5.0, lambda: _allocate_and_free(mnt), "allocate+free") != []
    holder.kill()
    holder.wait(timeout=DEADLINE)
    wait_until(lambda: used(mnt) == 0, "the holder's IDs to be freed when it exits")
    assert charges(mnt) == {"sev": 0, "sev_es": 0}
    assert daemon.process.poll() is None
    assert_no_traceback(daemon.log_path)
