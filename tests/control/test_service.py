"""The control service's answers to requests that arrive together (encidfs/control/service.py),
on an engine of its own, with a stand-in for process tracking."""

from __future__ import annotations

import os

from fakes import changes_for

from encidfs.control.service import ControlService, Peer
from encidfs.engine import new_engine

ROOT_PEER = Peer(os.getpid(), 0, 0)
FOREIGN_PEER = Peer(os.getpid() + 1, 0, 0)  # in a PID namespace of its own


class Tracker:
    """Every process is alive, started at tick 1, and its own thread group; FOREIGN_PEER's
    PID namespace sees PID p as p + 1000, the others see the daemon's.  A process's real
    and saved UIDs are those set in `uids`."""

    mode = "stand-in"

    def __init__(self) -> None:
        self.uids: dict[int, tuple[int, int]] = {}

    def owners(self, pid: int) -> tuple[int, int]:
        return self.uids[pid]

    def foreign(self, caller: int) -> bool:
        return caller == FOREIGN_PEER.pid

    def pid_from(self, caller: int, pid: int, thread: bool = False) -> int:
        return pid - 1000 if self.foreign(caller) else pid

    def pids_for(self, caller: int, pids: list[int]) -> list[int]:
        return [pid + 1000 for pid in pids] if self.foreign(caller) else pids

    def sync(self) -> None:
        pass

    def thread_group(self, pid: int) -> int:
        return pid

    def watch(self, pid: int) -> int:
        return 1

    def follows(self, pid: int, start: int) -> bool:
        return True


def service_counting_walks() -> tuple[ControlService, list[int]]:
    engine = new_engine({"sev": 4, "sev_es": 2})
    for name in ("a", "b"):
        engine.hierarchy.mkdir(engine.hierarchy.root, name)
    walks = [0]
    walk = engine.hierarchy.subtree_paths

    def counted(cg):
        walks[0] += 1
        return walk(cg)

    engine.hierarchy.subtree_paths = counted  # type: ignore[method-assign]
    return ControlService("/mnt", engine, Tracker(), changes_for(engine), lambda: None), walks


def test_statuses_with_no_change_between_them_share_one_reply_of_each_form() -> None:
    service, walks = service_counting_walks()
    asked = [{"op": "status"}, {"op": "status", "sparse": True}] * 3
    replies = service.answer_all([(request, ROOT_PEER) for request in asked])
    assert walks[0] == 2
    assert replies[0] is replies[2] is replies[4]
    assert replies[1] is replies[3] is replies[5]
    assert [cg["path"] for cg in replies[0]["cgroups"]] == ["/", "/a", "/b"]
    assert replies[1]["cgroups"][1] == {"path": "/a"}  # no css, no processes: nothing else


def test_a_status_after_a_change_in_the_same_round_sees_it() -> None:
    service, walks = service_counting_walks()
    replies = service.answer_all([({"op": "status"}, ROOT_PEER),
                                  ({"op": "allocate", "type": "sev"}, ROOT_PEER),
                                  ({"op": "status"}, ROOT_PEER),
                                  ({"op": "status"}, ROOT_PEER)])
    assert replies[1]["ok"], replies[1]
    assert walks[0] == 2
    assert replies[0]["holders"] == []
    assert [holder["ids"] for holder in replies[2]["holders"]] == [replies[1]["ids"]]
    assert replies[3] is replies[2]


def test_a_status_is_told_in_each_clients_pid_namespace() -> None:
    service, walks = service_counting_walks()
    replies = service.answer_all([({"op": "allocate", "type": "sev", "pid": 1001},
                                   FOREIGN_PEER),
                                  ({"op": "status"}, ROOT_PEER),
                                  ({"op": "status"}, FOREIGN_PEER)])
    assert replies[0]["holder"] == 1001  # as its client named it
    assert walks[0] == 1  # made once, told twice
    assert [holder["pid"] for holder in replies[1]["holders"]] == [1]
    assert [holder["pid"] for holder in replies[2]["holders"]] == [1001]


def test_a_tasks_cgroup_is_named_as_its_namer_sees_it() -> None:
    service, _ = service_counting_walks()
    hierarchy = service.hierarchy
    hierarchy.procs.attach(7, hierarchy.root.children["a"])
    replies = service.answer_all([({"op": "cgroup", "pid": 7}, ROOT_PEER),
                                  ({"op": "cgroup", "pid": 1007}, FOREIGN_PEER),
                                  ({"op": "cgroup", "pid": 1007, "seen_by": FOREIGN_PEER.pid},
                                   ROOT_PEER),
                                  ({"op": "cgroup", "pid": 8}, ROOT_PEER),
                                  ({"op": "cgroup", "pid": "7"}, ROOT_PEER),
                                  ({"op": "cgroup", "pid": 7, "seen_by": 0}, ROOT_PEER)])
    assert [reply.get("cgroup") for reply in replies[:4]] == ["/a", "/a", "/a", "/"]
    assert [reply["errno"] for reply in replies[4:]] == ["EINVAL", "EINVAL"]


def test_allocate_and_free_are_for_who_may_signal_the_holder_and_for_the_owner() -> None:
    service, _ = service_counting_walks()
    service.owner_uid = 500  # a user's mount
    service.hierarchy.procs.attach(7, service.hierarchy.root.children["a"])
    service.tracker.uids[7] = (1000, 1001)
    allocate = {"op": "allocate", "type": "sev", "pid": 7}

    def asked(request: dict, peer: Peer) -> dict:
        (reply,) = service.answer_all([(request, peer)])
        return reply

    for name, peer in {"real UID": Peer(50, 1000, 0), "saved UID": Peer(51, 1001, 0),
                       "owner": Peer(52, 500, 0), "root": Peer(53, 0, 0)}.items():
        allocated = asked(allocate, peer)
        assert allocated["ok"] and allocated["holder"] == 7, (name, allocated)
        freed = asked({"op": "free", "ids": allocated["ids"], "pid": 7}, peer)
        assert freed == {"ok": True, "ids": allocated["ids"], "holder": 7}, (name, freed)
    other = Peer(54, 1002, 0)
    assert asked(allocate, other)["errno"] == "EPERM"
    held = asked(allocate, ROOT_PEER)["ids"]
    assert asked({"op": "free", "ids": held, "pid": 7}, other)["errno"] == "EPERM"


def test_a_free_of_what_a_process_does_not_hold_is_einval_for_anyone() -> None:
    """Not held (the holder exited, say): the UIDs of that PID are not even read."""
    service, _ = service_counting_walks()
    replies = service.answer_all([({"op": "free", "ids": [1], "pid": 9}, Peer(50, 1000, 0)),
                                  ({"op": "free", "ids": [1], "pid": 9}, ROOT_PEER)])
    assert [reply["errno"] for reply in replies] == ["EINVAL", "EINVAL"]
