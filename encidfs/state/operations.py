"""The durable changes, by name: what a journal record may say.

A record is (an Op's value, its arguments).  Call sites name an Op, so that a change no one
applies is an AttributeError where it is asked for, not a record a restart cannot replay; and
Changes says which method applies each (state/changes.py), checked when that class is made.
The values are the names journals have always carried.
"""

from enum import StrEnum


class Op(StrEnum):
    # The tree and its settings.
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    APPEARED = "appeared"  # --over: a cgroup the kernel made
    VANISHED = "vanished"  # --over: a cgroup the kernel removed
    SUBTREE_CONTROL = "subtree_control"
    THREADED = "threaded"
    SET = "set"  # cgroup.max.depth, cgroup.max.descendants, cgroup.freeze
    # A controller's setting, which it applies itself (encids.<type>.max, misc.max, ...).
    # Its value is its name from when the only settings were limits: journals carry "set_max".
    CONTROLLER_SETTING = "set_max"
    # Node attributes.
    SETATTR = "setattr"
    SETXATTR = "setxattr"
    REMOVEXATTR = "removexattr"
    # Processes and IDs.
    ATTACH = "attach"
    ATTACH_THREAD = "attach_thread"
    ALLOCATE = "allocate"
    FREE = "free"
    FORK = "fork"
    THREADS = "threads"
    EXIT = "exit"
