"""Parsing written buffers the way the kernel's cgroup file handlers do.

kernfs hands a handler the written bytes NUL-terminated, so the text ends at the first NUL;
handlers then strstrip() it and convert numbers with the kstrto*() family.
"""

from __future__ import annotations

import errno

from ..engine import U64_MAX, fail

# The kernel's isspace(): \t \n \v \f \r, space, and Latin-1 no-break space (0xa0).
KERNEL_SPACE = b"\t\n\x0b\x0c\r \xa0"


def written_text(buf: bytes) -> bytes:
    """What a kernfs write handler sees: the buffer up to its first NUL."""
    nul = buf.find(b"\0")
    return buf if nul < 0 else buf[:nul]


def strstrip(buf: bytes) -> bytes:
    return buf.strip(KERNEL_SPACE)


_DIGITS = {8: b"01234567", 10: b"0123456789", 16: b"0123456789abcdefABCDEF"}


def _digits(text: bytes, base: int) -> tuple[int, int]:
    """_parse_integer(): the value of the leading digits and how many there were."""
    count = len(text) - len(text.lstrip(_DIGITS[base]))
    return (int(text[:count], base) if count else 0), count


def kstrtoull(text: bytes, base: int = 0) -> int:
    """kstrtoull(): an optional '+', then _kstrtoull()."""
    return _kstrtoull(text[1:] if text[:1] == b"+" else text, base)


def _kstrtoull(text: bytes, base: int) -> int:
    """A base-0 prefix, digits, one optional trailing newline; overflow is checked first."""
    if base == 0:
        if text[:2].lower() == b"0x" and text[2:3] and text[2:3] in b"0123456789abcdefABCDEF":
            base, text = 16, text[2:]
        elif text[:1] == b"0":
            base = 8
        else:
            base = 10
    value, count = _digits(text, base)
    if value > 2**64 - 1:
        raise fail(errno.ERANGE)
    if count == 0:
        raise fail(errno.EINVAL)
    rest = text[count:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        raise fail(errno.EINVAL)
    return value


def kstrtoint(text: bytes, base: int = 0) -> int:
    """kstrtoint(): kstrtoll() with a leading '-', then a range check to int."""
    if text[:1] == b"-":
        magnitude = _kstrtoull(text[1:], base)
        if magnitude > 2**63:
            raise fail(errno.ERANGE)
        value = -magnitude
    else:
        value = kstrtoull(text, base)
    if not -(2**31) <= value < 2**31:
        raise fail(errno.ERANGE)
    return value


def limit_text(value: int, unlimited: int = U64_MAX) -> str:
    """A limit as the kernel's files show it: "max" for `unlimited`, else the number."""
    return "max" if value == unlimited else str(value)
