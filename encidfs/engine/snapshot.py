"""The engine's state as plain data, and back: what a durable journal checkpoints.

`dump` writes every cgroup still in memory (live, and dying ones that charges pin), every css
(online, and offline ones still pinned) with its controller's own state, the members, and the
allocations, with the names of the released cgroups they were charged in.  `load` rebuilds
exactly that into a fresh engine and counts the pins, descendants, dying and populated
counters from it, children before parents: one pass, however deep the tree.  Older
snapshots (without threaded cgroups or split processes) load as they were.  A controller the
snapshot does not know starts afresh at the root, its books holding what is held; one the
engine no longer has is left out.
"""

from __future__ import annotations

from .allocator import Allocator
from .cgroup import Cgroup, Hierarchy
from .css import Css

# A snapshot names its records' fields; an older release wrote each as a list of these, in
# this order, shorter the older it is (what it did not have yet takes the default).
_CGROUP_FIELDS = ("id", "parent", "name", "dying", "subtree_control", "max_depth",
                  "max_descendants", "freeze", "dom", "frozen_ns", "freeze_since", "creator")
_CGROUP_DEFAULTS = {"dom": None, "frozen_ns": 0, "freeze_since": None, "creator": None}
_CSS_FIELDS = ("controller", "cgroup", "parent", "online", "state")


def _named(record: dict | list, fields: tuple[str, ...], defaults: dict) -> dict:
    if isinstance(record, dict):
        return {**defaults, **record}
    return {**defaults, **dict(zip(fields, record))}


def dump(h: Hierarchy, allocator: Allocator) -> dict:
    csses = _csses(h, allocator)
    css_index = {css: index for index, css in enumerate(csses)}
    cgroups = _cgroups(h, csses)
    return {
        "next_id": h._next_id,
        "cgroups": [{"id": cg.id, "parent": cg.parent.id if cg.parent else None,
                     "name": cg.name, "dying": cg.dying,
                     "subtree_control": h.names(cg.subtree_control),
                     "max_depth": cg.max_depth, "max_descendants": cg.max_descendants,
                     "freeze": cg.freeze, "dom": cg.dom.id if cg.is_threaded else None,
                     "frozen_ns": cg.frozen_ns, "freeze_since": cg.freeze_since,
                     "creator": None if cg.made_by is None else cg.made_by[1]}
                    for cg in cgroups],
        "csses": [{"controller": h.controllers[css.ssid].name, "cgroup": css.cgroup.id,
                   "parent": None if css.parent is None else css_index[css.parent],
                   "online": css.online, "state": h.controllers[css.ssid].dump_css(css)}
                  for css in csses],
        "members": sorted([pid, cg.id] for pid, cg in h.procs.members.items()),
        "threads": sorted([pid, tid, cg.id] for pid, threads in h.threads.split.items()
                          for tid, cg in threads.items()),
        "allocations": allocator.dump(css_index),
        "released": [_released_entry(cg) for cg in _released_origins(allocator, cgroups)],
    }


def load(h: Hierarchy, allocator: Allocator, data: dict) -> None:
    """Into `h` and `allocator`, an engine just made (its root alone)."""
    root = h.root
    cgroups: dict[int, Cgroup] = {}
    now = h.clock()
    for record in data["cgroups"]:
        entry = _named(record, _CGROUP_FIELDS, _CGROUP_DEFAULTS)
        cgid, parent_id, name, dying = entry["id"], entry["parent"], entry["name"], entry["dying"]
        # The domain of a threaded cgroup is kept, not derived: as in cgroup_enable_threaded(),
        # a threaded cgroup below a domain invalid one has the domain of the thread root above.
        dom_id = entry["dom"]
        if parent_id is None:
            cg = root
            del h.by_id[cg.id]
            cg.id = cgid
        else:
            parent = cgroups[parent_id]
            cg = Cgroup(cgid, name, parent, len(h.controllers))
            cg.dying = dying
            if dom_id is not None:
                cg.dom = cgroups[dom_id]
            if not dying:
                parent.children[name] = cg
        if not cg.dying:
            h.by_id[cgid] = cg
        cg.subtree_control = _mask(h, entry["subtree_control"])
        cg.max_depth, cg.max_descendants = entry["max_depth"], entry["max_descendants"]
        cg.freeze, cg.frozen_ns = entry["freeze"], entry["frozen_ns"]
        cg.freeze_since = entry["freeze_since"]
        if parent_id is not None:
            h.charge_creator(cg, entry["creator"])
        cgroups[cgid] = cg
    h._next_id = data["next_id"]
    freezing: dict[Cgroup, bool] = {}  # parents first: a snapshot older than freeze times
    for cg in cgroups.values():
        freezing[cg] = cg.freeze or (cg.parent is not None and freezing[cg.parent])
        if freezing[cg] and cg.freeze_since is None and not cg.dying:
            cg.freeze_since = now
    # made with the engine
    fresh_roots = {ssid: css for ssid, css in enumerate(root.css) if css is not None}
    root.css = [None] * len(h.controllers)
    csses: dict[int, Css] = {}  # by index in the snapshot
    for index, record in enumerate(data["csses"]):
        entry = _named(record, _CSS_FIELDS, {})
        name, cgid, parent_index = entry["controller"], entry["cgroup"], entry["parent"]
        online, state = entry["online"], entry["state"]
        controller = h.controller(name)
        if controller is None:
            continue  # a controller this daemon does not offer: its books are left out
        css = controller.css_alloc(cgroups[cgid], None if parent_index is None
                                   else csses[parent_index])
        css.online = online
        controller.load_css(css, state)
        if online:
            css.cgroup.css[css.ssid] = css
        csses[index] = css
    for ssid, css in fresh_roots.items():
        if root.css[ssid] is None:  # a controller the snapshot's daemon did not offer
            root.css[ssid] = css
            csses[-1 - ssid] = css
    for pid, cgid in data["members"]:
        h.procs.members[pid] = cgroups[cgid]
    for pid, tid, cgid in data.get("threads", []):
        h.threads.split.setdefault(pid, {})[tid] = cgroups[cgid]
    for pid in h.procs.members:
        for cg in h.threads.cgroups_of(pid):
            if cg.parent is not None:
                if cg.procs is None:
                    cg.procs = set()
                cg.procs.add(pid)
    # Released cgroups that allocations were charged in: names for their paths, nothing more.
    origins = dict(cgroups)
    for cgid, parent_id, name in data.get("released", []):
        released = Cgroup(cgid, name, origins[parent_id], len(h.controllers))
        released.dying, released.refs = True, 0
        origins[cgid] = released
    allocator.load(data.get("allocations", []), origins, csses)
    _recount(h, allocator, list(cgroups.values()), list(csses.values()))


def _csses(h: Hierarchy, allocator: Allocator) -> list[Css]:
    """Online csses of live cgroups and every css a charge pins, with their ancestors; parents
    before children."""
    found: set[Css] = set()
    for cg in h.subtree(h.root):
        found.update(css for css in cg.css if css is not None)
    for pinned in allocator.pins():
        for css in pinned.ancestors():
            if css in found:
                break
            found.add(css)
    return sorted(found, key=lambda css: (css.cgroup.level, css.cgroup.id, css.ssid,
                                          not css.online))


def _cgroups(h: Hierarchy, csses: list[Css]) -> list[Cgroup]:
    """Live cgroups and the dying ones the csses keep, with their ancestors; parents first."""
    found = set(h.subtree(h.root))
    for css in csses:
        for cg in css.cgroup.ancestors():
            if cg in found:
                break
            found.add(cg)
    return sorted(found, key=lambda cg: (cg.level, cg.id))


def _released_origins(allocator: Allocator, kept: list[Cgroup]) -> list[Cgroup]:
    """The cgroups allocations were charged in that are released by now (removed, and pinned
    by no css: a charge pins the css it went to, which may be an ancestor's), with their
    released ancestors; parents first."""
    found = set(kept)
    released: set[Cgroup] = set()
    for origin in allocator.origins():
        for cg in origin.ancestors():
            if cg in found or cg in released:
                break
            released.add(cg)
    return sorted(released, key=lambda cg: (cg.level, cg.id))


def _released_entry(cg: Cgroup) -> list:
    """A released cgroup as its path needs it: [id, parent's id, name]."""
    assert cg.parent is not None, "the root is never released"
    return [cg.id, cg.parent.id, cg.name]


def _mask(h: Hierarchy, names: list[str]) -> int:
    return sum(1 << c.ssid for c in h.controllers if c.name in names)


def _recount(h: Hierarchy, allocator: Allocator, cgroups: list[Cgroup],
             csses: list[Css]) -> None:
    """Every count that follows from the structure, as the operations would have left it."""
    for cg in cgroups:
        cg.refs = 0 if cg.dying else 1
    for css in csses:
        css.refs = 1 if css.online else 0
        css.nr_descendants = 0
        css.cgroup.refs += 1
    for css in csses:
        if css.parent is not None:
            css.parent.refs += 1
    for css in allocator.pins():
        css.refs += 1
    own_dying = {cg: [0] * len(h.controllers) for cg in cgroups}
    for css in csses:
        if not css.online:
            own_dying[css.cgroup][css.ssid] += 1
    # Children before parents: each level adds itself to its parent.
    for css in sorted(csses, key=lambda css: -css.cgroup.level):
        if css.parent is not None:
            css.parent.nr_descendants += css.online + css.nr_descendants
    for cg in sorted(cgroups, key=lambda cg: -cg.level):
        cg.nr_dying_subsys = [own + below for own, below in zip(own_dying[cg],
                                                                cg.nr_dying_subsys)]
        parent = cg.parent
        if parent is None:
            continue
        parent.refs += 1
        parent.nr_threaded_children += not cg.dying and cg.is_threaded
        parent.nr_descendants += (not cg.dying) + cg.nr_descendants
        parent.nr_dying_descendants += cg.dying + cg.nr_dying_descendants
        parent.nr_dying_subsys = [a + b for a, b in zip(parent.nr_dying_subsys,
                                                        cg.nr_dying_subsys)]
        if not cg.dying and cg.populated:
            parent.nr_populated_children += 1
            parent.nr_populated_domain_children += not cg.is_threaded
