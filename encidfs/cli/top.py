"""`encidfs top`: a live view of the tree, like systemd-cgtop, drawn with curses.

One row per cgroup: its usage of each type as a bar against its effective limit (the lowest
limit from it up to the root, or the capacity), its processes and holders, and its refusals,
with how many came since the last refresh.  Sorted by usage; `q` quits.  With `-n 1`, or when
the output is not a terminal, it prints snapshots as text instead.
"""

from __future__ import annotations

import curses
import sys
import time
from dataclasses import dataclass

from ..control.client import Client, figures

BAR = 10  # characters of a usage bar


@dataclass
class Row:
    path: str
    procs: int
    holders: int
    usage: list[tuple[str, int, int | None]]  # resource, current, effective limit (None: none)
    refusals: int
    rising: int  # refusals since the previous view

    @property
    def weight(self) -> float:
        return sum(current for _, current, _ in self.usage)


def rows(status: dict, previous: dict[str, int]) -> list[Row]:
    """The view of one status reply, heaviest first; `previous` maps each path to its
    refusals last time (updated)."""
    by_path = {cg["path"]: cg for cg in status["cgroups"]}
    holders: dict[str, set[int]] = {}
    for holder in status["holders"]:
        holders.setdefault(holder["cgroup"], set()).add(holder["pid"])
    found = []
    for cg in status["cgroups"]:
        controller = next((c for c in status["controllers"] if c in cg), None)
        usage, refusals = [], 0
        if controller is not None:
            for name in status["resources"][controller]:
                resource = figures(status, cg, controller, name)
                usage.append((name, resource["current"],
                              _effective_limit(status, by_path, cg["path"], controller, name)))
                refusals += resource.get("events", 0)
        found.append(Row(cg["path"], len(cg.get("procs", ())), len(holders.get(cg["path"], ())),
                         usage, refusals, refusals - previous.get(cg["path"], refusals)))
        previous[cg["path"]] = refusals
    return sorted(found, key=lambda row: (-row.weight, row.path))


def _effective_limit(status: dict, by_path: dict[str, dict], path: str, controller: str,
                     name: str) -> int | None:
    """The lowest limit of the cgroup and its ancestors (the root's capacity at most, for a
    resource that has one); None if nothing limits it."""
    limit = figures(status, by_path["/"], controller, name).get("capacity")
    while True:
        resource = by_path.get(path, {}).get(controller, {}).get(name)
        if resource is not None and resource.get("max", "max") != "max":
            limit = resource["max"] if limit is None else min(limit, resource["max"])
        if path == "/":
            return limit
        path = path.rsplit("/", 1)[0] or "/"


def _bar(current: int, limit: int | None) -> str:
    if limit is None:
        filled = 0
    elif limit <= 0:  # a type without IDs, or a limit of 0
        filled = BAR if current else 0
    else:
        filled = min(BAR, round(BAR * current / limit))
    return "#" * filled + "." * (BAR - filled)


def _shown(limit: int | None) -> str:
    return "max" if limit is None else str(limit)


def lines(status: dict, view: list[Row], width: int) -> list[str]:
    used = "  ".join(f"{name} {current}/{_shown(limit)}" for name, current, limit
                     in next((row.usage for row in view if row.path == "/"), []))
    usages = ["  ".join(f"{name} [{_bar(current, limit)}] {current}/{_shown(limit)}"
                        for name, current, limit in row.usage) or "-" for row in view]
    column = max([len("usage (current/limit)"), *map(len, usages)])
    out = [f"encidfs top: {status['mountpoint']}   {used}"[:width],
           f"{'cgroup':<24} {'procs':>5} {'holders':>7}  {'usage (current/limit)':<{column}}"
           f"  {'refused':>7}"[:width]]
    for row, usage in zip(view, usages):
        rising = f" +{row.rising}" if row.rising else ""
        out.append(f"{row.path[-24:]:<24} {row.procs:>5} {row.holders:>7}  {usage:<{column}}"
                   f"  {row.refusals:>7}{rising}"[:width])
    return out


def run(client: Client, delay: float, count: int | None) -> int:
    if count is not None or not sys.stdout.isatty():
        return _print(client, delay, count or 1)
    return curses.wrapper(_live, client, delay)


def _print(client: Client, delay: float, count: int) -> int:
    previous: dict[str, int] = {}
    for n in range(count):
        if n:
            time.sleep(delay)
            print()
        status = client.status(sparse=True)
        print("\n".join(lines(status, rows(status, previous), 200)), flush=True)
    return 0


def _live(screen: curses.window, client: Client, delay: float) -> int:
    curses.curs_set(0)
    screen.timeout(int(delay * 1000))  # getch() waits this long: the refresh interval
    previous: dict[str, int] = {}
    while True:
        status = client.status(sparse=True)
        height, width = screen.getmaxyx()
        screen.erase()
        for y, line in enumerate(lines(status, rows(status, previous), width - 1)[:height]):
            screen.addstr(y, 0, line, curses.A_BOLD if y < 2 else curses.A_NORMAL)
        screen.refresh()
        if screen.getch() in (ord("q"), ord("Q")):
            return 0
