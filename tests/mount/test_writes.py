"""How written text is parsed: what kernfs hands a handler (up to the first NUL, the whole
buffer whatever the offset), strstrip(), and the kstrto*() rules of each file.

`cg` is a fresh cgroup of a shared instance whose root enables encids; it has no processes
and no children, and its own cgroup.subtree_control is empty."""

from __future__ import annotations

import os

import pytest
from mountutil import outcome, read, sh, write, write_result

# -- what a handler sees ------------------------------------------------------------------------

def assert_limit_write(path, text, expected):
    """Over a limit of 3: an errno name leaves 3 in place, anything else is the new value."""
    write(path, "3")
    result = write_result(path, text)
    if expected.startswith("E"):
        assert result == expected
        assert read(path) == "3\n"
    else:
        assert result == "OK"
        assert read(path) == expected + "\n"


def test_text_ends_at_the_first_nul(cg):
    assert write_result(cg / "cgroup.max.depth", b"3\0junk") == "OK"
    assert read(cg / "cgroup.max.depth") == "3\n"
    assert write_result(cg / "cgroup.max.depth", b"max\0\xff\xfe 12") == "OK"
    assert read(cg / "cgroup.max.depth") == "max\n"


def test_a_leading_nul_leaves_nothing_to_parse(cg):
    assert write_result(cg / "cgroup.max.depth", b"\x005") == "EINVAL"
    assert read(cg / "cgroup.max.depth") == "max\n"


@pytest.mark.parametrize("space", [b" ", b"\t", b"\n", b"\v", b"\f", b"\r", b"\xa0"],
                         ids=["space", "tab", "newline", "vtab", "formfeed", "return", "nbsp"])
def test_surrounding_kernel_whitespace_is_stripped(cg, space):
    assert write_result(cg / "cgroup.max.depth", space * 2 + b"7" + space * 3) == "OK"
    assert read(cg / "cgroup.max.depth") == "7\n"
    assert write_result(cg / "encids.sev.max", space + b"12" + space) == "OK"
    assert read(cg / "encids.sev.max") == "12\n"


def test_mixed_whitespace_around_max_is_stripped(cg):
    write(cg / "cgroup.max.depth", "3")
    assert write_result(cg / "cgroup.max.depth", b" \t\n\xa0max\r\f\v ") == "OK"
    assert read(cg / "cgroup.max.depth") == "max\n"


def test_a_write_at_any_offset_is_parsed_whole(cg):
    assert write_result(cg / "cgroup.max.depth", "5", offset=1000) == "OK"
    assert read(cg / "cgroup.max.depth") == "5\n"
    assert write_result(cg / "encids.sev.max", "42\n", offset=3) == "OK"
    assert read(cg / "encids.sev.max") == "42\n"


@pytest.mark.parametrize("name", ["cgroup.max.depth", "cgroup.procs", "cgroup.subtree_control",
                                  "cgroup.kill", "encids.sev.max", "cgroup.type"])
def test_an_empty_write_returns_zero_and_changes_nothing(cg, name):
    before = {n: read(cg / n) for n in ("cgroup.max.depth", "cgroup.procs",
                                        "cgroup.subtree_control", "encids.sev.max")}
    assert write(cg / name, b"") == 0
    assert {n: read(cg / n) for n in before} == before


def test_open_with_o_trunc_and_truncate_succeed(cg):
    assert write(cg / "cgroup.max.depth", "4", flags=os.O_TRUNC) == 1
    assert read(cg / "cgroup.max.depth") == "4\n"
    os.truncate(cg / "cgroup.max.depth", 0)
    assert read(cg / "cgroup.max.depth") == "4\n"


def test_several_writes_on_one_descriptor_each_apply(cg):
    fd = os.open(cg / "cgroup.max.depth", os.O_RDWR)
    try:
        for value in (b"3", b"max", b"9\n"):
            assert os.write(fd, value) == len(value)
            assert os.pread(fd, 100, 0) == value.strip() + b"\n"
        assert outcome(lambda: os.write(fd, b"-1")) == "ERANGE"
        assert os.pread(fd, 100, 0) == b"9\n"
    finally:
        os.close(fd)


def test_shell_redirections_write(cg):
    sh(f"echo 5 > {cg}/cgroup.max.depth")
    assert sh(f"cat {cg}/cgroup.max.depth").stdout == "5\n"
    sh(f"echo 6 >> {cg}/cgroup.max.depth")
    assert read(cg / "cgroup.max.depth") == "6\n"
    sh(f"printf max > {cg}/cgroup.max.depth")
    assert read(cg / "cgroup.max.depth") == "max\n"
    result = sh(f"echo -1 > {cg}/cgroup.max.depth", check=False)
    assert result.returncode != 0 and "Numerical result out of range" in result.stderr


# -- cgroup.max.depth and cgroup.max.descendants: "max" or kstrtoint base 0, not negative -------

LIMIT_CASES = [
    ("max", "max"), ("max\n", "max"), ("7", "7"), ("0", "0"), ("0x10", "16"), ("0X1f", "31"),
    ("010", "8"), ("+5", "5"), ("-0", "0"), ("2147483646", "2147483646"),
    ("2147483647", "max"), ("0x7fffffff", "max"),
    ("-1", "ERANGE"), ("-2147483648", "ERANGE"), ("2147483648", "ERANGE"),
    ("-2147483649", "ERANGE"), ("99999999999999", "ERANGE"),
    ("99999999999999999999999", "ERANGE"),
    ("MAX", "EINVAL"), ("5 6", "EINVAL"), ("5\n6", "EINVAL"), ("\n", "EINVAL"), ("0x", "EINVAL"),
    ("08", "EINVAL"), ("abc", "EINVAL"), ("5x", "EINVAL"), ("1.5", "EINVAL"), ("--5", "EINVAL"),
    ("-+5", "EINVAL"), ("++5", "EINVAL"), ("max 1", "EINVAL"),
]


@pytest.mark.parametrize("name", ["cgroup.max.depth", "cgroup.max.descendants"])
@pytest.mark.parametrize("text, expected", LIMIT_CASES, ids=[repr(c[0]) for c in LIMIT_CASES])
def test_hierarchy_limit_parsing(cg, name, text, expected):
    assert_limit_write(cg / name, text, expected)


def test_root_limits_are_writable(shared_mnt):
    for name in ("cgroup.max.depth", "cgroup.max.descendants"):
        assert write_result(shared_mnt / name, "1000") == "OK"
        assert read(shared_mnt / name) == "1000\n"
        assert write_result(shared_mnt / name, "-1") == "ERANGE"
        write(shared_mnt / name, "max")
        assert read(shared_mnt / name) == "max\n"


# -- encids.<type>.max: "max" or kstrtoull base 0 ---------------------------------------------

ENCIDS_MAX_CASES = [
    ("max", "max"), ("0", "0"), ("7", "7"), ("0x10", "16"), ("010", "8"), ("+5", "5"),
    ("1000", "1000"), ("4294967296", "4294967296"),
    ("18446744073709551614", "18446744073709551614"), ("18446744073709551615", "max"),
    ("0xffffffffffffffff", "max"),
    ("18446744073709551616", "ERANGE"), ("0x10000000000000000", "ERANGE"),
    ("-1", "EINVAL"), ("-0", "EINVAL"), ("\n", "EINVAL"), (" ", "EINVAL"), ("1 2", "EINVAL"),
    ("abc", "EINVAL"), ("MAX", "EINVAL"), ("0x", "EINVAL"), ("09", "EINVAL"),
    ("max\nmax", "EINVAL"),
]


@pytest.mark.parametrize("type_name", ["sev", "sev_es"])
@pytest.mark.parametrize("text, expected", ENCIDS_MAX_CASES,
                         ids=[repr(c[0]) for c in ENCIDS_MAX_CASES])
def test_encids_max_parsing(cg, type_name, text, expected):
    name = f"encids.{type_name}.max"
    assert_limit_write(cg / name, text, expected)


def test_encids_max_above_the_capacity_or_below_the_usage_is_accepted(cg):
    assert write_result(cg / "encids.sev_es.max", "100") == "OK"  # capacity 99
    assert read(cg / "encids.sev_es.max") == "100\n"
    assert write_result(cg / "encids.sev.max", "0") == "OK"
    assert read(cg / "encids.sev.max") == "0\n"


def test_limits_of_one_type_leave_the_other_alone(cg):
    write(cg / "encids.sev.max", "5")
    assert read(cg / "encids.sev_es.max") == "max\n"


# -- cgroup.subtree_control: space-separated "+name" / "-name" ---------------------------------

SUBTREE_CASES = [
    ("+encids", "encids\n"), ("  +encids \n", "encids\n"), ("+encids  +encids", "encids\n"),
    ("-encids", ""), ("-encids  -encids", ""), ("+encids -encids", ""),
    ("-encids +encids", "encids\n"), ("\n", ""), ("+encids\t", "encids\n"),
    ("+foo", "EINVAL"), ("encids", "EINVAL"), ("+", "EINVAL"), ("-", "EINVAL"),
    ("+ENCIDS", "EINVAL"), ("-encids\t-encids", "EINVAL"), ("+encids\t+encids", "EINVAL"),
    ("+encids,+encids", "EINVAL"), ("+encids +foo", "EINVAL"), ("*encids", "EINVAL"),
]


@pytest.mark.parametrize("text, expected", SUBTREE_CASES, ids=[repr(c[0]) for c in SUBTREE_CASES])
def test_subtree_control_parsing(cg, text, expected):
    result = write_result(cg / "cgroup.subtree_control", text)
    if expected.startswith("E"):
        assert result == expected
        assert read(cg / "cgroup.subtree_control") == ""  # nothing applied
    else:
        assert result == "OK"
        assert read(cg / "cgroup.subtree_control") == expected


def test_subtree_control_disabling_what_is_not_enabled_is_a_no_op(cg):
    assert write_result(cg / "cgroup.subtree_control", "-encids") == "OK"
    assert read(cg / "cgroup.subtree_control") == ""


def test_subtree_control_last_token_wins_over_an_enabled_controller(cg):
    write(cg / "cgroup.subtree_control", "+encids")
    assert write_result(cg / "cgroup.subtree_control", "-encids +encids -encids") == "OK"
    assert read(cg / "cgroup.subtree_control") == ""


# -- cgroup.procs and cgroup.threads: a PID, kstrtoint base 0 after strstrip -------------------

PID_CASES = [
    ("abc", "EINVAL"), ("-1", "EINVAL"), ("1 2", "EINVAL"), (" ", "EINVAL"), ("\n", "EINVAL"),
    ("12abc", "EINVAL"), ("99999999999", "EINVAL"), ("-0x10", "EINVAL"),
    ("4194305", "ESRCH"), ("0x400001", "ESRCH"), ("2147483647", "ESRCH"),
]


@pytest.mark.parametrize("name", ["cgroup.procs", "cgroup.threads"])
@pytest.mark.parametrize("text, expected", PID_CASES, ids=[repr(c[0]) for c in PID_CASES])
def test_pid_parsing(cg, name, text, expected):
    assert write_result(cg / name, text) == expected
    assert read(cg / name) == ""


# -- cgroup.freeze, cgroup.kill, cgroup.type ---------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1", "1"), ("0", "0"), (" 1\n", "1"), ("0x1", "1"), ("01", "1"),
    ("2", "ERANGE"), ("-1", "ERANGE"), ("99999999999", "ERANGE"),
    ("x", "EINVAL"), ("\n", "EINVAL"), ("1 1", "EINVAL"),
])
def test_freeze_parsing(cg, text, expected):
    result = write_result(cg / "cgroup.freeze", text)
    if expected.startswith("E"):
        assert result == expected
        assert read(cg / "cgroup.freeze") == "0\n"
    else:
        assert result == "OK"
        assert read(cg / "cgroup.freeze") == expected + "\n"


@pytest.mark.parametrize("text, expected", [
    ("1", "OK"), (" 1\n", "OK"), ("0x1", "OK"),
    ("0", "ERANGE"), ("2", "ERANGE"), ("-1", "ERANGE"),
    ("x", "EINVAL"), ("\n", "EINVAL"), ("1 1", "EINVAL"),
])
def test_kill_parsing(cg, text, expected):
    assert write_result(cg / "cgroup.kill", text) == expected


@pytest.mark.parametrize("text", ["domain", "domain threaded", "threadedx", "Threaded",
                                  "\n", "threaded threaded", "thread"])
def test_type_accepts_nothing_but_threaded(cg, text):
    assert write_result(cg / "cgroup.type", text) == "EINVAL"
    assert read(cg / "cgroup.type") == "domain\n"
