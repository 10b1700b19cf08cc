"""The encidfs command.  A client command (cli/commands.py) starts without the daemon's modules,
which were 70 of its 120 ms of start-up; everything else is cli/main.py's."""

from __future__ import annotations

import os
import sys

from .cli import commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not os.path.basename(sys.argv[0]).startswith("mount."):  # mount(8)'s helper: cli/main.py
        status = commands.main(argv)
        if status is not None:
            return status
    from .cli.main import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
