"""The journal's files without a mount: what a store reads back after a crash at any point of a
commit or a checkpoint, and what a failed append leaves behind."""

import errno
import json
import os

import pytest

from encidfs.state.store import StateError, StateStore

LAYOUT = {"sev": 4}


def opened(path, state=None):
    """A store opened on `state` (a test changes it in place) as the state it keeps."""
    held = {"n": 0} if state is None else state
    store = StateStore(str(path), LAYOUT, durable=False)
    store.open(lambda: dict(held))
    return store


def crashed(store):
    """The daemon gone without a clean stop: its descriptors closed, its files as they are."""
    store._close()
    os.close(store._lock)


def reopened(path):
    store = StateStore(str(path), LAYOUT, durable=False)
    snapshot, records, old = store.open(dict)
    assert old is None
    crashed(store)
    return snapshot, records


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state.db"


def test_records_come_back_in_order_with_the_facts_before_them(path):
    store = opened(path)
    store.append(("mkdir", 1, "a"))
    store.stage(("fork", 10, 11, 5))
    store.append_all([("set_max", 2, "encids", "sev", 3), ("rmdir", 2)])
    crashed(store)
    assert reopened(path) == ({"n": 0}, [("mkdir", 1, "a"), ("fork", 10, 11, 5),
                                         ("set_max", 2, "encids", "sev", 3), ("rmdir", 2)])


def test_a_commit_cut_short_is_left_out_whole(path):
    """A group of changes is one line: a crash (or a full disk) in the middle of it leaves
    none of the group, not its first few."""
    store = opened(path)
    store.append(("mkdir", 1, "a"))
    crashed(store)
    group = json.dumps([["mkdir", 1, "b"], ["mkdir", 1, "c"]]) + "\n"
    with open(f"{path}.log", "a") as log:
        log.write(group[:-1])  # all but its newline
    assert reopened(path)[1] == [("mkdir", 1, "a")]


def test_a_log_older_than_the_snapshot_is_not_read(path):
    """A crash between a checkpoint's two renames: the snapshot is the new one, which holds
    what the old log says."""
    state = {"n": 0}
    store = opened(path, state)
    store.append(("mkdir", 1, "a"))
    old_log = open(f"{path}.log", "rb").read()
    state["n"] = 1
    store.checkpoint()
    crashed(store)
    with open(f"{path}.log", "wb") as log:
        log.write(old_log)
    assert reopened(path) == ({"n": 1}, [])


def test_a_checkpoint_leaves_a_snapshot_and_an_empty_log(path):
    state = {"n": 0}
    store = opened(path, state)
    for n in range(5):
        store.append(("mkdir", 1, f"c{n}"))
    state["n"] = 5
    store.close()
    assert reopened(path) == ({"n": 5}, [])
    assert oct(os.stat(f"{path}.log").st_mode & 0o777) == oct(os.stat(path).st_mode & 0o777) \
        == "0o600"


def test_a_failed_append_changes_nothing_and_the_next_write_writes_all_anew(path, monkeypatch):
    state = {"n": 0}
    store = opened(path, state)
    store.append(("mkdir", 1, "a"))
    size = os.path.getsize(f"{path}.log")
    real_write = os.write

    def short_write(fd, data):  # a disk that fills up in the middle of the line
        return real_write(fd, data[:5])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError) as refused:
        store.append(("mkdir", 1, "b"))
    assert refused.value.errno == errno.ENOSPC
    assert os.path.getsize(f"{path}.log") == size  # the part written is cut off again
    monkeypatch.undo()
    store._retry_at = 0  # the next try is due
    state["n"] = "a"  # what memory holds: mkdir a, not b
    store.append(("mkdir", 1, "c"))
    crashed(store)
    assert reopened(path) == ({"n": "a"}, [("mkdir", 1, "c")])


@pytest.mark.parametrize("damage", ["delete the log", "truncate the log", "delete the snapshot"])
def test_damage_between_commits_is_seen_before_the_next(path, damage):
    store = opened(path, {"n": "all"})
    store.append(("mkdir", 1, "a"))
    log = f"{path}.log"
    if damage == "delete the log":
        os.unlink(log)
    elif damage == "truncate the log":
        os.truncate(log, os.path.getsize(log) - 1)
    else:
        os.unlink(path)
    store.append(("mkdir", 1, "b"))
    crashed(store)
    assert reopened(path) == ({"n": "all"}, [("mkdir", 1, "b")])


def test_a_damaged_file_is_refused_with_one_line_and_left_as_it_is(path):
    store = opened(path)
    store.append(("mkdir", 1, "a"))
    crashed(store)
    with open(f"{path}.log", "ab") as log:
        log.write(b"not json\n")  # a whole line, not a commit cut short
    before = open(f"{path}.log", "rb").read()
    store = StateStore(str(path), LAYOUT, durable=False)
    with pytest.raises(StateError, match="cannot be read"):
        store.open(dict)
    os.close(store._lock)
    assert open(f"{path}.log", "rb").read() == before
