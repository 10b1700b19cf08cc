"""The cgroup tree and the cgroup v2 core rules (Documentation/admin-guide/cgroup-v2.rst).

Every operation either applies completely or raises an OSError carrying the errno the kernel's
cgroup files return.  An operation that changes what a restart must restore takes a `commit`
callback, which it calls once its checks have passed and before it changes anything: a durable
journal writes the change there, and if it cannot (commit raises), nothing has changed.
Nothing here does I/O, and what changed is appended to `events` for the layers above to
drain.

Processes are kept beside the tree: the tree's own, plain PIDs that the process tracker reports,
in the books of membership.py (`Hierarchy.procs`), and the threads of a process split across
cgroups in those of threads.py (`Hierarchy.threads`).  The rules here ask
`Hierarchy.membership`, which is those books or, under --over, the kernel's tree.  Where
threads may go on their own (cgroup.type: threaded cgroups and their thread root) is the
tree's, here.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator

from .budget import Budget
from .css import Controller, Css, CssT, follows_processes
from .errors import fail
from .events import Commit, Event, TreeEvent, no_journal
from .freezer import Freezer
from .membership import Membership, Procs
from .refcount import cgroup_put, css_put
from .threads import Threads

INT_MAX = 2**31 - 1  # cgroup.max.depth / cgroup.max.descendants "max"


class Cgroup:
    __slots__ = (
        "id", "name", "parent", "level", "children", "subtree_control", "max_depth",
        "max_descendants", "nr_descendants", "nr_dying_descendants", "procs",
        "nr_populated_children", "nr_populated_domain_children", "freeze", "dying", "refs",
        "css", "nr_dying_subsys", "dom", "nr_threaded_children", "frozen_ns", "freeze_since",
        "made_by",
    )

    def __init__(self, cgid: int, name: str, parent: Cgroup | None, nr_controllers: int) -> None:
        self.id = cgid
        self.name = name
        self.parent = parent
        self.level: int = parent.level + 1 if parent else 0
        self.children: dict[str, Cgroup] = {}  # live children only; dying ones have no name
        self.subtree_control = 0  # bitmask of controller ssids enabled for the children
        self.max_depth = INT_MAX
        self.max_descendants = INT_MAX
        self.nr_descendants = 0  # live descendants
        self.nr_dying_descendants = 0
        # TGIDs with a thread here (None while empty: saves memory), kept by membership.py.
        self.procs: set[int] | None = None
        self.nr_populated_children = 0
        self.nr_populated_domain_children = 0  # of them, those not threaded
        # The domain the cgroup's resources belong to (the kernel's dom_cgrp): itself, or for
        # a threaded cgroup the thread root of its subtree.
        self.dom = self
        self.nr_threaded_children = 0
        # Time spent freezing (cgroup.freeze here or above), ended intervals, and when the
        # current one began (the hierarchy's clock), for cgroup.stat.local.
        self.frozen_ns = 0
        self.freeze_since: int | None = None
        self.freeze = False
        self.dying = False
        # Pins: one while live, one per css of its own and per child cgroup not yet released.
        self.refs = 1
        self.css: list[Css | None] = [None] * nr_controllers
        self.nr_dying_subsys = [0] * nr_controllers
        # The budget its creator is charged in, and who, until it is released.
        self.made_by: tuple[Budget, int] | None = None

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def is_threaded(self) -> bool:
        return self.dom is not self

    @property
    def populated(self) -> bool:
        return bool(self.procs) or self.nr_populated_children > 0

    def ancestors(self, include_self: bool = True) -> Iterator[Cgroup]:
        cg = self if include_self else self.parent
        while cg is not None:
            yield cg
            cg = cg.parent

    @property
    def path(self) -> str:
        names = [cg.name for cg in self.ancestors() if cg.parent is not None]
        return "/" + "/".join(reversed(names))

    def __repr__(self) -> str:
        return f"<Cgroup {self.path}{' dying' if self.dying else ''}>"


class Hierarchy:
    def __init__(self, controllers: list[Controller], max_cgroups: int = INT_MAX,
                 clock: Callable[[], int] = time.monotonic_ns,
                 membership: Callable[[Hierarchy], Membership] | None = None,
                 budget: Budget | None = None) -> None:
        """`max_cgroups` caps the cgroups below the root, live and dying, as the root's
        cgroup.max.descendants would (the daemon's memory is the limit a kernel would have);
        `budget` shares them out to the users who make them (mkdir's `creator`).
        `clock` is the kernel's ktime_get_ns(): nanoseconds, the same for every process.
        `membership`: makes, for this hierarchy, what keeps where processes are, if not its
        own books (under --over, the kernel's tree, which the hierarchy mirrors)."""
        self.controllers = controllers
        self.clock = clock
        self.max_cgroups = max_cgroups
        self.budget = budget
        for ssid, controller in enumerate(controllers):
            controller.ssid = ssid
            controller.hierarchy = self
        self.all_controllers = (1 << len(controllers)) - 1
        self.threaded_controllers = sum(1 << c.ssid for c in controllers if c.threaded)
        self.following = [c for c in controllers if follows_processes(c)]
        self._next_id = 0
        self.by_id: dict[int, Cgroup] = {}
        self.events: list[Event] = []  # the event bus, drained by the daemon
        self.freezer = Freezer(self)
        self.procs = Procs(self)
        self.threads = Threads(self)
        self.root = self._new_cgroup("", None)
        for controller in controllers:
            self._css_online(self.root, controller)
        self.membership: Membership = self.procs if membership is None else membership(self)

    # -- lookups ------------------------------------------------------------------------------

    def controller(self, name: str) -> Controller | None:
        return next((c for c in self.controllers if c.name == name), None)

    def controllers_of(self, cg: Cgroup) -> int:
        """The cgroup.controllers mask: what the parent offers (everything at the root), and
        in a threaded cgroup only the threaded controllers of that (cgroup_control())."""
        if cg.parent is None:
            return self.all_controllers
        if cg.is_threaded:
            return cg.parent.subtree_control & self.threaded_controllers
        return cg.parent.subtree_control

    def names(self, mask: int) -> list[str]:
        return [c.name for c in self.controllers if mask & (1 << c.ssid)]

    # -- the cgroup's type (cgroup.type) ---------------------------------------------------

    def is_thread_root(self, cg: Cgroup) -> bool:
        """cgroup_is_thread_root(): the domain of a threaded subtree below it."""
        if cg.is_threaded:
            return False
        return bool(cg.nr_threaded_children) or bool(
            cg.procs and cg.subtree_control & self.threaded_controllers)

    def is_valid_domain(self, cg: Cgroup) -> bool:
        """cgroup_is_valid_domain(): whether cg can be a domain (host processes and domain
        controllers).  Below a thread root other than the root, or in a threaded subtree, a
        domain cgroup is invalid."""
        if cg.is_threaded:
            return False
        for ancestor in cg.ancestors(include_self=False):
            if ancestor.parent is not None and self.is_thread_root(ancestor):
                return False
            if ancestor.is_threaded:
                return False
        return True

    def can_be_thread_root(self, cg: Cgroup) -> bool:
        """cgroup_can_be_thread_root(): the root always; a domain cgroup with no populated
        domain children and no domain controllers enabled."""
        if cg.parent is None:
            return True
        if cg.is_threaded or cg.nr_populated_domain_children:
            return False
        return not cg.subtree_control & ~self.threaded_controllers

    def type_of(self, cg: Cgroup) -> str:
        """What cgroup.type reads."""
        if cg.is_threaded:
            return "threaded"
        if not self.is_valid_domain(cg):
            return "domain invalid"
        if self.is_thread_root(cg):
            return "domain threaded"
        return "domain"

    def enable_threaded(self, cg: Cgroup, commit: Commit = no_journal) -> None:
        """cgroup_enable_threaded(): "threaded" written to cgroup.type (not on the root)."""
        self._check_live(cg)
        assert cg.parent is not None, "the root has no cgroup.type"
        if cg.is_threaded:
            return
        # Checked on cg itself: the parent's checks below catch these only when it is not the
        # root.
        if cg.populated or cg.subtree_control & ~self.threaded_controllers:
            raise fail(errno.EOPNOTSUPP, "the cgroup has processes or domain controllers")
        dom = cg.parent.dom
        if not self.is_valid_domain(dom) or not self.can_be_thread_root(dom):
            raise fail(errno.EOPNOTSUPP, f"{dom.path} cannot be a thread root")
        commit()
        for node in self.subtree(cg):
            if node is cg or node.is_threaded:
                node.dom = dom
        cg.parent.nr_threaded_children += 1
        # A threaded cgroup keeps the threaded controllers only.
        for controller in self.controllers:
            css = cg.css[controller.ssid]
            if css is not None and not controller.threaded:
                self._css_offline(css)
        self.events.append((TreeEvent.FILES, cg))

    def effective_css(self, cg: Cgroup, controller: Controller[CssT]) -> CssT:
        """The css that accounts for processes in `cg`: its own, or the nearest ancestor's."""
        for ancestor in cg.ancestors():
            css = controller.cgroup_css(ancestor)
            if css is not None:
                return css
        raise AssertionError("the root has every controller's css")

    def drain_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # -- mkdir / rmdir --------------------------------------------------------------------------

    def mkdir(self, parent: Cgroup, name: str, commit: Commit = no_journal,
              at: int | None = None, creator: int | None = None) -> Cgroup:
        """`at`: when (the clock's time), for a change replayed from a journal; `creator`:
        the user charged in the budget while the cgroup lives and dies."""
        self._check_live(parent)
        if "\n" in name or "/" in name or name in ("", ".", ".."):
            raise fail(errno.EINVAL, "bad cgroup name")
        if name in parent.children:
            raise fail(errno.EEXIST)  # the VFS finds the name before cgroup_mkdir() runs
        if self.root.nr_descendants + self.root.nr_dying_descendants >= self.max_cgroups:
            raise fail(errno.EAGAIN, f"the daemon's cap of {self.max_cgroups} cgroups")
        depth = 1  # of the new cgroup below `ancestor`
        ancestor: Cgroup | None = parent
        while ancestor is not None:
            if ancestor.nr_descendants >= ancestor.max_descendants or depth > ancestor.max_depth:
                raise fail(errno.EAGAIN, f"limit of {ancestor.path}")
            depth += 1
            ancestor = ancestor.parent
        if self.budget is not None and creator is not None:
            self.budget.check(creator)
        commit()
        cg = self._add_child(parent, name, None, at)
        self.charge_creator(cg, creator)
        return cg

    def charge_creator(self, cg: Cgroup, creator: int | None) -> None:
        if self.budget is not None and creator is not None:
            self.budget.take(creator)
            cg.made_by = (self.budget, creator)

    def mirror(self, parent: Cgroup, name: str, cgid: int) -> Cgroup:
        """A cgroup the kernel has made (under --over), known by the kernel's cgroup ID: its
        limits were the kernel's to check."""
        self._check_live(parent)
        if name in parent.children or cgid in self.by_id:
            raise fail(errno.EEXIST)
        return self._add_child(parent, name, cgid, None)

    def _add_child(self, parent: Cgroup, name: str, cgid: int | None, at: int | None) -> Cgroup:
        cg = self._new_cgroup(name, parent, cgid)
        parent.children[name] = cg
        parent.refs += 1
        if parent.freeze_since is not None:  # the parent is freezing (set while it is)
            cg.freeze_since = self.clock() if at is None else at
        ancestor: Cgroup | None = parent
        while ancestor is not None:
            ancestor.nr_descendants += 1
            ancestor = ancestor.parent
        for controller in self.controllers:
            if self.controllers_of(cg) & (1 << controller.ssid):
                self._css_online(cg, controller)
        return cg

    def rmdir(self, cg: Cgroup, commit: Commit = no_journal) -> None:
        self._check_live(cg)
        if cg.parent is None or cg.populated or cg.children:
            raise fail(errno.EBUSY)
        commit()
        del cg.parent.children[cg.name]
        del self.by_id[cg.id]
        cg.dying = True
        if cg.is_threaded:
            cg.parent.nr_threaded_children -= 1
        ancestor: Cgroup | None = cg.parent
        while ancestor is not None:
            ancestor.nr_descendants -= 1
            ancestor.nr_dying_descendants += 1
            ancestor = ancestor.parent
        self.events.append((TreeEvent.REMOVED, cg))
        for css in cg.css:
            if css is not None:
                self._css_offline(css)
        cgroup_put(cg)  # the pin it held while live

    # -- cgroup.subtree_control, limits ---------------------------------------------------------

    def vet_subtree_control(self, cg: Cgroup, enable: int, disable: int) -> tuple[int, int]:
        """Check a "+name"/"-name" change (disjoint ssid masks) as the kernel does before it
        touches anything; return what it really enables and disables."""
        self._check_live(cg)
        enable &= ~cg.subtree_control
        disable &= cg.subtree_control
        if enable & ~self.controllers_of(cg):
            raise fail(errno.ENOENT, "the parent does not offer that controller")
        for child in cg.children.values():
            if child.subtree_control & disable:
                raise fail(errno.EBUSY, f"{child.path} still enables it")
        if enable:
            self._vet_enable(cg, enable)
        return enable, disable

    def _vet_enable(self, cg: Cgroup, enable: int) -> None:
        """cgroup_vet_subtree_control_enable(): where controllers may be enabled.  The
        membership tells the cgroup's type (a threaded cgroup's domain, the thread root above,
        is valid by construction) and whether it has processes of its own."""
        if self.membership.is_hierarchy_root(cg):
            return  # a valid domain, exempt from the no-internal-process rule
        kind = self.membership.type_of(cg)
        if kind == "domain invalid":
            raise fail(errno.EOPNOTSUPP, "the cgroup cannot host resources")
        if enable & ~self.threaded_controllers:
            if kind != "domain":
                raise fail(errno.EOPNOTSUPP, "no domain controllers in a threaded subtree")
        elif kind == "threaded" or self.can_be_thread_root(cg):
            return  # threaded controllers compete with processes
        # The no-internal-process rule (disabling is always allowed).
        if self.membership.has_tasks(cg):
            raise fail(errno.EBUSY, "the cgroup has processes")

    def write_subtree_control(self, cg: Cgroup, enable: int, disable: int,
                              commit: Commit = no_journal) -> None:
        """Apply "+name"/"-name" sets; `enable` and `disable` are disjoint ssid masks."""
        enable, disable = self.vet_subtree_control(cg, enable, disable)
        if not enable and not disable:
            return
        commit()
        following = [c for c in self.following if (enable | disable) & (1 << c.ssid)]
        before = {(pid, controller): self.effective_css(self.procs.cgroup_of(pid), controller)
                  for child in cg.children.values() for pid in self.procs.subtree_pids(child)
                  for controller in following}
        cg.subtree_control = (cg.subtree_control | enable) & ~disable
        for child in cg.children.values():
            for controller in self.controllers:
                bit = 1 << controller.ssid
                if enable & bit & self.controllers_of(child):
                    self._css_online(child, controller)
                elif disable & bit and (css := child.css[controller.ssid]) is not None:
                    self._css_offline(css)
            self.events.append((TreeEvent.FILES, child))
        # The processes below move to their new csses, as cgroup_update_dfl_csses() migrates
        # them.  Not vetoed: the kernel's can_attach could refuse the whole write, which no
        # controller here needs yet.
        for (pid, controller), src_css in before.items():
            dst_css = self.effective_css(self.procs.cgroup_of(pid), controller)
            if dst_css is not src_css:
                controller.attach(pid, src_css, dst_css)

    def set_max_depth(self, cg: Cgroup, value: int, commit: Commit = no_journal) -> None:
        self._check_live(cg)
        commit()
        cg.max_depth = value

    def set_max_descendants(self, cg: Cgroup, value: int, commit: Commit = no_journal) -> None:
        self._check_live(cg)
        commit()
        cg.max_descendants = value

    # -- where processes may go -----------------------------------------------------------------

    def vet_destination(self, dst: Cgroup) -> None:
        """cgroup_migrate_vet_dst(): whether processes or threads may move into dst."""
        self._check_live(dst)
        if not self.is_valid_domain(dst.dom):
            raise fail(errno.EOPNOTSUPP, "the cgroup cannot host processes (domain invalid)")
        # A thread root (or one that can become one) and a threaded cgroup are exempt.
        if dst.subtree_control and not (dst.is_threaded or self.can_be_thread_root(dst)):
            raise fail(errno.EBUSY, "no internal processes: the cgroup enables controllers")

    # -- walks ----------------------------------------------------------------------------------

    def subtree(self, cg: Cgroup) -> Iterator[Cgroup]:
        """cg and its live descendants, parents before children."""
        stack = [cg]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def subtree_paths(self, cg: Cgroup) -> Iterator[tuple[Cgroup, str]]:
        """subtree(), each with its path, made on the way down (Cgroup.path walks up)."""
        stack = [(cg, cg.path)]
        while stack:
            node, path = stack.pop()
            yield node, path
            if node.children:  # most are leaves: nothing to set up for them
                prefix = "" if path == "/" else path
                stack.extend((child, f"{prefix}/{name}") for name, child in node.children.items())

    # -- internals ------------------------------------------------------------------------------

    def _new_cgroup(self, name: str, parent: Cgroup | None, cgid: int | None = None) -> Cgroup:
        if cgid is None:
            cgid = self._next_id
            self._next_id += 1
        cg = Cgroup(cgid, name, parent, len(self.controllers))
        self.by_id[cg.id] = cg
        return cg

    def _check_live(self, cg: Cgroup) -> None:
        if cg.dying:
            raise fail(errno.ENODEV, "the cgroup was removed")

    def _css_online(self, cg: Cgroup, controller: Controller) -> None:
        parent = cg.parent.css[controller.ssid] if cg.parent else None
        css = controller.css_alloc(cg, parent)
        cg.css[controller.ssid] = css
        cg.refs += 1
        if parent is not None:
            parent.refs += 1
        ancestor = parent
        while ancestor is not None:
            ancestor.nr_descendants += 1
            ancestor = ancestor.parent

    def _css_offline(self, css: Css) -> None:
        ssid = css.ssid
        css.online = False
        css.cgroup.css[ssid] = None
        cg: Cgroup | None = css.cgroup
        while cg is not None:
            cg.nr_dying_subsys[ssid] += 1
            cg = cg.parent
        ancestor = css.parent
        while ancestor is not None:
            ancestor.nr_descendants -= 1
            ancestor = ancestor.parent
        css_put(css)  # the pin it held while online
