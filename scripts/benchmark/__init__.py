"""The sections of scripts/bench.py, and what they all use: the checkout measured (today's
code), Skip, and C programs compiled on the spot."""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the engine, without installing the package


class Skip(Exception):
    """A target that cannot run here; the message says why, in one line."""


@contextlib.contextmanager
def compiled(source, *flags):
    """The C program `source`, compiled into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="encidfs-bench-") as work:
        program = os.path.join(work, source.stem)
        subprocess.run(["gcc", "-O2", *flags, "-o", program, str(source)], check=True)
        yield program
