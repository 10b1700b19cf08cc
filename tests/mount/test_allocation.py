"""The allocation path with real processes: charges, limits, capacity, holders, the control
socket's protocol and permissions, and the `encidfs run`/`alloc`/`free` commands."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from mountutil import DEADLINE, keyed, nested, pids, read, sh, wait_until, write

from encidfs.client import Client, ControlError, figures

ENCIDFS = [sys.executable, "-m", "encidfs"]
NOBODY = 65534


# -- helpers ------------------------------------------------------------------------------------

def current(cg, type_name="sev"):
    return int(read(cg / f"encids.{type_name}.current"))


def used(mnt, type_name="sev"):
    return keyed(read(mnt / f"encids.{type_name}.stat"))["used"]


def refusals(cg, type_name="sev"):
    return read(cg / f"encids.{type_name}.events")


def move(pid, cg):
    write(cg / "cgroup.procs", str(pid))


def refused(action):
    """The ControlError that action() raised (fails if it raised none)."""
    with pytest.raises(ControlError) as info:
        action()
    return info.value


def encidfs(*args, check=False):
    return subprocess.run([*ENCIDFS, *args], capture_output=True, text=True, timeout=DEADLINE,
                          check=check)


def control_path(mnt):
    return os.getxattr(mnt, "user.encidfs.control").decode()


class Raw:
    """A control connection spoken to in raw bytes, as a careless client would."""

    def __init__(self, mnt):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(control_path(mnt))
        self.reader = self.sock.makefile("rb")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line)

    def reply(self):
        line = self.reader.readline()
        return json.loads(line) if line else None

    def ask(self, line: bytes):
        self.send(line)
        return self.reply()

    def close(self):
        self.reader.close()
        self.sock.close()


@pytest.fixture
def raw(mnt):
    connections = []

    def connect():
        connections.append(Raw(mnt))
        return connections[-1]

    yield connect
    for connection in connections:
        connection.close()


# -- charging and ID numbers ------------------------------------------------------------------

def test_allocation_charges_the_holders_cgroup_and_its_ancestors(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        ids = client.allocate("sev", count=3, pid=holder.pid)
        assert ids == [1, 2, 3]
        assert ids.cgroup == "/a"
        assert current(a) == 3
        assert used(mnt) == 3
        assert current(a, "sev_es") == 0 and used(mnt, "sev_es") == 0
        assert read(mnt / "encids.sev.stat") == "total 509\nused 3\n"

        assert client.allocate("sev_es", count=2, pid=holder.pid) == [510, 511]
        assert current(a, "sev_es") == 2 and used(mnt, "sev_es") == 2

        client.free([1, 2], pid=holder.pid)
        assert current(a) == 1 and used(mnt) == 1
        assert client.allocate("sev", count=3, pid=holder.pid) == [1, 2, 4]
        client.free([1, 2, 3, 4, 510, 511], pid=holder.pid)
        assert current(a) == 0 and used(mnt) == 0
        assert current(a, "sev_es") == 0
        assert client.allocate("sev", count=2, pid=holder.pid) == [1, 2]


def test_allocation_is_a_context_manager_that_frees(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        with client.allocate("sev", count=2, pid=holder.pid) as ids:
            assert ids == [1, 2]
            assert current(a) == 2
        assert current(a) == 0 and used(mnt) == 0
        assert client.allocate("sev", pid=holder.pid) == [1]


def test_alloc_and_free_commands(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev", "--count", "3",
                     "--pid", str(holder.pid))
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n2\n3\n", "")
    assert current(a) == 3
    result = encidfs("free", "--mount", str(mnt), "--pid", str(holder.pid), "1", "3")
    assert (result.returncode, result.stderr) == (0, "")
    assert current(a) == 1 and used(mnt) == 1
    result = encidfs("alloc", "--mount", str(mnt), "--type", "sev", "--count", "2",
                     "--pid", str(holder.pid))
    assert result.stdout == "1\n3\n"


def test_encidfs_run_holds_the_ids_while_the_command_runs(cgroup, mnt, procs):
    """A process moved into /a becomes `encidfs run`, which becomes the command."""
    a = cgroup("a")
    script = (f'echo $$ > "{a}/cgroup.procs" && exec {" ".join(ENCIDFS)} run --mount "{mnt}" '
              f"--type sev --count 2 --print-ids -- sleep 100")
    runner = procs.start(["bash", "-c", script], stderr=subprocess.PIPE, text=True)
    assert runner.stderr.readline() == "1 2\n"
    wait_until(lambda: current(a) == 2, "a/encids.sev.current to be 2")
    assert used(mnt) == 2
    assert pids(a) == [runner.pid]
    wait_until(lambda: os.readlink(f"/proc/{runner.pid}/exe").endswith("/sleep"),
               "encidfs run to exec sleep")
    assert current(a) == 2  # the exec kept them: the same process holds them
    runner.kill()
    wait_until(lambda: current(a) == 0, "the IDs of the killed command to be freed")
    assert used(mnt) == 0
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", count=2) == [1, 2]


def test_asids_layout_splits_sev_and_sev_es(mount_encidfs, procs):
    mnt = mount_encidfs("--asids", "16", "--min-sev-asid", "5")
    assert read(mnt / "encids.sev.stat") == "total 12\nused 0\n"
    assert read(mnt / "encids.sev_es.stat") == "total 4\nused 0\n"
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", count=3, pid=holder.pid) == [5, 6, 7]
        assert client.allocate("sev_es", count=2, pid=holder.pid) == [1, 2]
        client.free([6, 1], pid=holder.pid)
        assert client.allocate("sev", count=2, pid=holder.pid) == [6, 8]
        assert client.allocate("sev_es", count=3, pid=holder.pid) == [1, 3, 4]
        error = refused(lambda: client.allocate("sev_es", pid=holder.pid))
        assert (error.errno, error.cgroup) == (errno.EBUSY, "/a")  # capacity, at the first level
        assert client.allocate("sev", count=8, pid=holder.pid) == [9, 10, 11, 12, 13, 14, 15, 16]
        error = refused(lambda: client.allocate("sev", pid=holder.pid))
        assert error.errno == errno.EBUSY
        assert current(a) == 12 and current(a, "sev_es") == 4
        assert used(mnt) == 12 and used(mnt, "sev_es") == 4


def test_default_layout_puts_sev_es_after_sev(mount_encidfs):
    mnt = mount_encidfs()
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev_es") == [510]
        assert client.allocate("sev", count=509)[-1] == 509
        assert client.allocate("sev_es", count=98)[-1] == 608
        assert refused(lambda: client.allocate("sev")).errno == errno.EBUSY
        assert refused(lambda: client.allocate("sev_es")).errno == errno.EBUSY


def test_allocating_for_a_thread_charges_its_process(cgroup, mnt, procs):
    a = cgroup("a")
    process, tid = procs.threaded()
    move(process.pid, a)
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", pid=tid) == [1]
        holders = client.status()["holders"]
    assert [(h["pid"], h["cgroup"], h["ids"]) for h in holders] == [(process.pid, "/a", [1])]
    process.kill()
    wait_until(lambda: current(a) == 0, "the thread's process's IDs to be freed")


# -- limits and capacity ------------------------------------------------------------------------

def test_limit_refuses_with_ebusy_naming_the_limiting_cgroup(mnt, procs):
    a, b = nested(mnt)
    write(a / "encids.sev.max", "1")
    holder = procs.sleep()
    move(holder.pid, b)
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", pid=holder.pid) == [1]
        error = refused(lambda: client.allocate("sev", pid=holder.pid))
        assert error.errno == errno.EBUSY
        assert error.cgroup == "/a"
        assert "/a" in error.strerror
        # The refusing level and its ancestors count the event; the charged child does not.
        assert refusals(a) == "max 1\n"
        assert refusals(b) == "max 0\n"
        assert refusals(a, "sev_es") == "max 0\n"
        assert (current(a), current(b), used(mnt)) == (1, 1, 1)
        # A charge of several is refused as a whole.
        write(a / "encids.sev.max", "2")
        error = refused(lambda: client.allocate("sev", count=2, pid=holder.pid))
        assert (error.errno, error.cgroup) == (errno.EBUSY, "/a")
        assert refusals(a) == "max 2\n"
        assert (current(a), current(b), used(mnt)) == (1, 1, 1)
        assert client.allocate("sev", pid=holder.pid) == [2]
        # A limit at the child itself refuses there, and /a counts it too.
        write(b / "encids.sev.max", "2")
        write(a / "encids.sev.max", "max")
        error = refused(lambda: client.allocate("sev", pid=holder.pid))
        assert (error.errno, error.cgroup) == (errno.EBUSY, "/a/b")
        assert (refusals(b), refusals(a)) == ("max 1\n", "max 3\n")


def test_limit_below_usage_is_accepted_and_refuses_later_charges(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", count=3, pid=holder.pid)
        write(a / "encids.sev.max", "1")
        assert current(a) == 3
        assert refused(lambda: client.allocate("sev", pid=holder.pid)).cgroup == "/a"
        client.free([1, 2], pid=holder.pid)
        assert refused(lambda: client.allocate("sev", pid=holder.pid)).errno == errno.EBUSY
        client.free([3], pid=holder.pid)
        assert client.allocate("sev", pid=holder.pid) == [1]


def test_encidfs_run_refused_by_a_limit_prints_one_line(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", pid=holder.pid)
    write(a / "encids.sev.max", "1")
    result = encidfs("run", "--mount", str(mnt), "--cgroup", "/a", "--type", "sev", "--",
                     "echo", "must not run")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "encidfs: sev: EBUSY: refused by the encids limit of /a\n"
    assert current(a) == 1 and used(mnt) == 1
    assert refusals(a) == "max 1\n"
    wait_until(lambda: pids(a) == [holder.pid], "the refused runner to leave /a")


def test_capacity_refuses_at_the_root(mount_encidfs, procs):
    mnt = mount_encidfs("--capacity", "sev=2")
    assert read(mnt / "encids.sev.stat") == "total 2\nused 0\n"
    write(mnt / "cgroup.subtree_control", "+encids")
    a = mnt / "a"
    a.mkdir()
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev") == [1]  # held by this process, at the root
        assert client.allocate("sev", pid=holder.pid) == [2]
        for pid in (None, holder.pid):
            error = refused(lambda: client.allocate("sev", pid=pid))
            assert (error.errno, error.cgroup) == (errno.EBUSY, "/"), pid
        assert refusals(a) == "max 0\n"  # refused above /a: /a does not count it
        assert read(mnt / "encids.sev.stat") == "total 2\nused 2\n"
        assert current(a) == 1


def test_unknown_type_and_type_without_ids_are_einval(mount_encidfs):
    mnt = mount_encidfs("--capacity", "sev=0", "--capacity", "tdx=3")
    assert read(mnt / "encids.sev.stat") == "total 0\nused 0\n"
    with Client.connect(mount=mnt) as client:
        assert refused(lambda: client.allocate("sev")).errno == errno.EINVAL
        assert refused(lambda: client.allocate("sev_es")).errno == errno.EINVAL
        assert refused(lambda: client.allocate("nope")).errno == errno.EINVAL
        assert client.allocate("tdx", count=3) == [1, 2, 3]
        assert refused(lambda: client.allocate("tdx")).errno == errno.EBUSY
    assert used(mnt, "sev") == 0
    result = encidfs("run", "--mount", str(mnt), "--type", "nope", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("encidfs: nope: EINVAL: ")
    assert result.stderr.count("\n") == 1


# -- holders that move, exit, or outlive their cgroup ------------------------------------------

def test_moving_the_holder_leaves_the_charge_behind(cgroup, mnt, procs):
    a, b = cgroup("a"), cgroup("b")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        first = client.allocate("sev", count=2, pid=holder.pid)
        move(holder.pid, b)
        assert (current(a), current(b), used(mnt)) == (2, 0, 2)
        second = client.allocate("sev", pid=holder.pid)
        assert second.cgroup == "/b"
        assert (current(a), current(b), used(mnt)) == (2, 1, 3)
        client.free(first, pid=holder.pid)
        assert (current(a), current(b), used(mnt)) == (0, 1, 1)
    holder.kill()
    wait_until(lambda: current(b) == 0, "the moved holder's IDs to be freed")
    assert used(mnt) == 0


def test_killing_the_holder_frees_its_ids(cgroup, mnt, procs):
    a = cgroup("a")
    first, second = procs.sleep(), procs.sleep()
    move(first.pid, a)
    move(second.pid, a)
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", count=2, pid=first.pid) == [1, 2]
        assert client.allocate("sev", pid=second.pid) == [3]
        first.kill()
        wait_until(lambda: current(a) == 1, "a/encids.sev.current to drop to 1")
        assert used(mnt) == 1
        assert client.allocate("sev", count=3, pid=second.pid) == [1, 2, 4]
        assert [h["pid"] for h in client.status()["holders"]] == [second.pid]


def test_holder_at_the_root_is_watched_too(mnt, procs):
    holder = procs.sleep()
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev", count=2, pid=holder.pid).cgroup == "/"
        assert used(mnt) == 2
        holder.kill()
        wait_until(lambda: used(mnt) == 0, "the root holder's IDs to be freed")


def test_holder_pins_its_removed_cgroup_until_it_exits(cgroup, mnt, procs):
    a = cgroup("a")
    holder = procs.sleep()
    move(holder.pid, a)
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", count=2, pid=holder.pid)
    move(holder.pid, mnt)
    a.rmdir()
    stat = keyed(read(mnt / "cgroup.stat"))
    assert stat["nr_dying_descendants"] == 1
    assert stat["nr_descendants"] == 0
    assert used(mnt) == 2
    holder.kill()
    wait_until(lambda: keyed(read(mnt / "cgroup.stat"))["nr_dying_descendants"] == 0,
               "the removed cgroup to be released with its last charge")
    assert used(mnt) == 0
    assert keyed(read(mnt / "cgroup.stat"))["nr_dying_subsys_encids"] == 0


# -- who may allocate for whom ----------------------------------------------------------------

_AS_NOBODY = r"""
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
reader = sock.makefile("rb")
def ask(**request):
    sock.sendall(json.dumps(request).encode() + b"\n")
    return json.loads(reader.readline())
me = os.getpid()
out = {"uid": os.getuid(), "pid": me, "status": ask(op="status")["ok"],
       "for_init": ask(op="allocate", type="sev", pid=1),
       "in_the_root": ask(op="allocate", type="sev")}
print(json.dumps(out), flush=True)
sys.stdin.readline()  # placed in a cgroup meanwhile
out = {"for_self": ask(op="allocate", type="sev", pid=me),
       "implicit": ask(op="allocate", type="sev"),
       "free_roots": ask(op="free", ids=[int(sys.argv[2])], pid=int(sys.argv[3])),
       "free_roots_as_own": ask(op="free", ids=[int(sys.argv[2])])}
out["free_own"] = ask(op="free", ids=out["for_self"].get("ids", [0]))
print(json.dumps(out), flush=True)
"""


def _as_nobody(argv: list[str], **kwargs) -> subprocess.Popen:
    setpriv = shutil.which("setpriv")
    if setpriv:
        return subprocess.Popen([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                 "--clear-groups", *argv], **kwargs)
    return subprocess.Popen(argv, user=NOBODY, group=NOBODY, extra_groups=[], **kwargs)


def test_others_allocate_only_for_their_own_processes_placed_in_a_cgroup(mount_encidfs, procs):
    mnt = mount_encidfs("--control-mode", "0666")
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "t").mkdir()
    holder = procs.sleep()
    with Client.connect(mount=mnt) as client:
        roots = client.allocate("sev", pid=holder.pid)  # the owner charges the root
    nobody = _as_nobody([sys.executable, "-c", _AS_NOBODY, control_path(mnt), str(roots[0]),
                         str(holder.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True)
    try:
        first = json.loads(nobody.stdout.readline())
        assert first["uid"] == NOBODY and first["status"] is True
        assert first["for_init"]["errno"] == "EPERM"
        assert first["in_the_root"]["errno"] == "EPERM"  # the owner places it first
        move(first["pid"], mnt / "t")
        nobody.stdin.write("placed\n")
        nobody.stdin.flush()
        out = json.loads(nobody.stdout.readline())
    finally:
        nobody.stdin.close()
        nobody.wait(timeout=DEADLINE)
    assert out["for_self"]["ok"] and out["for_self"]["ids"] == [2]
    assert out["for_self"]["holder"] == first["pid"] and out["for_self"]["cgroup"] == "/t"
    assert out["implicit"]["ok"] and out["implicit"]["holder"] == first["pid"]
    assert out["free_roots"]["errno"] == "EPERM"  # not the holder, not the owner
    assert out["free_roots_as_own"]["errno"] == "EINVAL"  # not held by the one asking
    assert out["free_own"]["ok"]
    # Its other ID went with it when it exited; the owner's holder's is untouched.
    wait_until(lambda: used(mnt) == 1, "the exited non-root holder's IDs to be freed")
    with Client.connect(mount=mnt) as client:
        assert [h["ids"] for h in client.status()["holders"]] == [[1]]


@pytest.mark.parametrize("options, may_connect", [
    ((), False),
    (("--control-mode", "0660"), False),
    (("--control-mode", "0660", "--control-group", str(NOBODY)), True),
], ids=["owner only by default", "group mode, owner's group", "group mode, nobody's group"])
def test_the_control_sockets_mode_and_group_decide_who_may_ask(mount_encidfs, options,
                                                                may_connect):
    mnt = mount_encidfs(*options)
    path = control_path(mnt)
    info = os.stat(path)
    assert oct(info.st_mode & 0o777) == ("0o660" if options else "0o600")
    assert info.st_gid == (NOBODY if may_connect else 0)
    asking = _as_nobody([sys.executable, "-c", "import socket, sys\n"
                         "socket.socket(socket.AF_UNIX).connect(sys.argv[1])", path],
                        stderr=subprocess.PIPE, text=True)
    _, stderr = asking.communicate(timeout=DEADLINE)
    assert (asking.returncode == 0) == may_connect, stderr
    if not may_connect:
        assert "PermissionError" in stderr


# -- concurrency ------------------------------------------------------------------------------

def test_concurrent_clients_never_exceed_the_limit(cgroup, mnt, procs):
    a = cgroup("a")
    write(a / "encids.sev.max", "5")
    holders = [procs.sleep() for _ in range(16)]
    for holder in holders:
        move(holder.pid, a)
    clients = [Client.connect(mount=mnt) for _ in holders]
    start = threading.Barrier(len(holders) + 1)
    results: dict[int, object] = {}
    seen: list[int] = []
    done = threading.Event()

    def allocate(index):
        start.wait()
        try:
            results[index] = clients[index].allocate("sev", pid=holders[index].pid)
        except ControlError as error:
            results[index] = error

    def watch():
        while not done.is_set():
            seen.append(current(a))

    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(len(holders))]
    watcher = threading.Thread(target=watch)
    try:
        watcher.start()
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join(DEADLINE)
        done.set()
        watcher.join(DEADLINE)
        granted = {i: r for i, r in results.items() if not isinstance(r, ControlError)}
        errors = [r for r in results.values() if isinstance(r, ControlError)]
        assert len(results) == 16
        assert len(granted) == 5
        assert sorted(id_ for ids in granted.values() for id_ in ids) == [1, 2, 3, 4, 5]
        assert [(e.errno, e.cgroup) for e in errors] == [(errno.EBUSY, "/a")] * 11
        assert current(a) == 5 and used(mnt) == 5
        assert max(seen) <= 5
        assert refusals(a) == "max 11\n"

        lucky = sorted(granted)
        clients[lucky[0]].free(granted[lucky[0]], pid=holders[lucky[0]].pid)
        clients[lucky[1]].free(granted[lucky[1]], pid=holders[lucky[1]].pid)
        assert current(a) == 3
        holders[lucky[2]].kill()
        wait_until(lambda: current(a) == 2, "a killed holder's ID to be freed")
        assert used(mnt) == 2
    finally:
        done.set()
        for client in clients:
            client.close()


# -- the shell sequence of the issue ----------------------------------------------------------

def test_shell_sequence_of_the_issue(cgroup, mnt, procs, tmp_path):
    """The user's shell joins /a and starts `encidfs run ... &`, staying around as an
    interactive shell would; a second shell in /a sets the limit and is refused."""
    a = cgroup("a")
    env = {**os.environ, "ENCIDFS_MOUNT": str(mnt),
           "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}
    assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "encidfs"))
    log = tmp_path / "run.log"
    shell = procs.start(["bash", "-c", f"""
        cd "$ENCIDFS_MOUNT"
        echo $$ > a/cgroup.procs
        encidfs run --type sev -- sleep 100 > "{log}" 2>&1 &
        echo $!
        wait
    """], env=env, stdout=subprocess.PIPE, text=True)
    background = int(shell.stdout.readline())
    try:
        wait_until(lambda: current(a) == 1, "a/encids.sev.current to rise to 1")
        assert sorted(pids(a)) == sorted([shell.pid, background])
        assert used(mnt) == 1

        refused_run = sh("""
            cd "$ENCIDFS_MOUNT"
            echo $$ > a/cgroup.procs
            echo 1 > a/encids.sev.max
            encidfs run --type sev -- sleep 100
        """, check=False, env=env)
        assert refused_run.returncode == 1
        assert refused_run.stderr == "encidfs: sev: EBUSY: refused by the encids limit of /a\n"
        assert current(a) == 1
        assert read(a / "encids.sev.events") == "max 1\n"

        sh(f"kill {background}")
        wait_until(lambda: current(a) == 0, "a/encids.sev.current to drop back to 0")
        assert used(mnt) == 0
        shell.wait(DEADLINE)  # its `wait` returned: the job is gone
        assert log.read_text() == ""
    finally:
        try:
            os.kill(background, 9)
        except ProcessLookupError:
            pass


# -- the raw protocol -------------------------------------------------------------------------

MALFORMED = [
    (b"not json", "EINVAL"),
    (b"", "EINVAL"),
    (b"\xff\xfe", "EINVAL"),
    (b"[1, 2]", "EINVAL"),
    (b'"allocate"', "EINVAL"),
    (b"42", "EINVAL"),
    (b"{}", "EINVAL"),
    (b'{"op": "nope"}', "EINVAL"),
    (b'{"op": null}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": 0}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": -1}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": "x"}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": true}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": 1.0}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "count": null}', "EINVAL"),
    (b'{"op": "allocate", "count": 1}', "EINVAL"),
    (b'{"op": "allocate", "type": 7}', "EINVAL"),
    (b'{"op": "allocate", "type": "nope"}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "pid": 0}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "pid": -3}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "pid": "1"}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "pid": false}', "EINVAL"),
    (b'{"op": "allocate", "type": "sev", "pid": 2147483647}', "ESRCH"),
    (b'{"op": "allocate", "type": "sev", "count": 100000000000000000000}', "EBUSY"),
    (b'{"op": "free", "ids": [4242]}', "EINVAL"),
    (b'{"op": "free", "ids": []}', "EINVAL"),
    (b'{"op": "free", "ids": "1"}', "EINVAL"),
    (b'{"op": "free", "ids": [true]}', "EINVAL"),
    (b'{"op": "free", "ids": [-1]}', "EINVAL"),
    (b'{"op": "free"}', "EINVAL"),
]


def test_malformed_requests_get_an_error_and_the_connection_goes_on(mnt, raw):
    connection = raw()
    wrong = []
    for line, expected in MALFORMED:
        reply = connection.ask(line + b"\n")
        if reply is None:
            pytest.fail(f"the daemon closed the connection after {line!r}")
        if reply.get("ok") is not False or reply.get("errno") != expected \
                or not isinstance(reply.get("error"), str):
            wrong.append((line, expected, reply))
        after = connection.ask(b'{"op": "status"}\n')
        assert after is not None and after["ok"], f"no service after {line!r}"
    assert wrong == []
    # Nothing was charged, and real requests still work on the same connection.
    assert used(mnt) == 0
    assert connection.ask(b'{"op": "allocate", "type": "sev"}\n')["ids"] == [1]
    assert connection.ask(b'{"op": "free", "ids": [1]}\n')["ok"]


def test_several_requests_in_one_write_get_replies_in_order(mnt, raw):
    connection = raw()
    connection.send(b'{"op":"allocate","type":"sev"}\nnope\n{"op":"allocate","type":"sev"}\n')
    replies = [connection.reply() for _ in range(3)]
    assert replies[0]["ids"] == [1]
    assert replies[1]["errno"] == "EINVAL"
    assert replies[2]["ids"] == [2]


def test_thousands_of_requests_in_one_write_are_all_answered_in_order(mnt, raw):
    """The daemon takes a few dozen lines of a connection a round (the rest wait in its
    buffer): all of them are answered, in order, and other clients are served meanwhile."""
    connection = raw()
    pairs = 1500
    batch = b'{"op":"allocate","type":"sev"}\n{"op":"free","ids":[1]}\n' * pairs
    sender = threading.Thread(target=connection.send, args=(batch + b'{"op":"stat',))
    sender.start()
    with Client.connect(mount=mnt) as other:
        assert other.status()["ok"]
    for _ in range(pairs):
        assert connection.reply()["ids"] == [1]
        assert connection.reply() == {"ok": True, "ids": [1], "holder": os.getpid()}
    sender.join(timeout=DEADLINE)
    assert connection.ask(b'us"}\n')["ok"]  # the line cut at the end of the batch, whole
    assert used(mnt) == 0


def test_free_of_some_unallocated_ids_frees_nothing(mnt):
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", count=2)
        error = refused(lambda: client.free([1, 7]))
        assert error.errno == errno.EINVAL
        assert used(mnt) == 2
        assert refused(lambda: client.free([1, 1])).errno == errno.EINVAL
        assert used(mnt) == 2
        client.free([2, 1])
        assert used(mnt) == 0


@pytest.mark.parametrize("line", [
    pytest.param(b'{"op": []}', id="unhashable-op"),
    pytest.param(b'{"op": {"x": 1}}', id="object-op"),
    pytest.param(b"[" * 50000, id="deeply-nested"),
    pytest.param(b'{"a":' * 10000 + b"1" + b"}" * 10000, id="deeply-nested-object"),
])
def test_odd_json_gets_an_error_reply(mnt, raw, line):
    connection = raw()
    reply = connection.ask(line + b"\n")
    assert reply is not None, "the daemon closed the connection without a reply"
    assert reply["ok"] is False and reply["errno"] == "EINVAL"
    assert connection.ask(b'{"op": "status"}\n')["ok"]


@pytest.mark.parametrize("line", [
    pytest.param(b"x" * 200_000, id="200KiB-garbage"),
    pytest.param(b"x" * 70_000, id="70KiB-garbage"),
    pytest.param(b'{"op": "status", "pad": "' + b" " * 100_000 + b'"}', id="100KiB-valid-json"),
])
def test_line_over_64k_is_refused_with_e2big_and_the_connection_closed(mnt, raw, line):
    connection = raw()
    try:
        connection.send(line + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: the reply is queued all the same
    reply = connection.reply()
    assert reply is not None and reply["ok"] is False, f"got {reply!r}"
    assert reply["errno"] == "E2BIG"
    try:
        rest = connection.reader.readline()
    except ConnectionResetError:
        rest = b""
    assert rest == b"", "the connection stays open after an over-long line"
    with Client.connect(mount=mnt) as client:
        assert client.allocate("sev") == [1]


def test_status_bigger_than_64k_reaches_the_client(mnt):
    """Replies have no length limit in the protocol; a big tree must not break `status`."""
    write(mnt / "cgroup.subtree_control", "+encids")
    for i in range(400):
        (mnt / f"c{i:03}").mkdir()
    with Client.connect(mount=mnt) as client:
        status = client.status()
    assert len(status["cgroups"]) == 401
    result = encidfs("status", "--mount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert "/c399" in result.stdout


def test_a_sparse_status_leaves_out_just_the_figures_of_a_new_cgroup(mnt, procs):
    write(mnt / "cgroup.subtree_control", "+encids +misc")
    for name in ("limited", "holding", "refused", "new"):
        (mnt / name).mkdir()
    write(mnt / "limited/encids.sev_es.max", "3")
    write(mnt / "refused/misc.max", "sev 0")
    holder, refused = procs.sleep(), procs.sleep()
    write(mnt / "holding/cgroup.procs", str(holder.pid))
    write(mnt / "refused/cgroup.procs", str(refused.pid))
    with Client.connect(mount=mnt) as client:
        client.allocate("sev", pid=holder.pid)
        with pytest.raises(ControlError):
            client.allocate("sev", pid=refused.pid)
        full, sparse = client.status(), client.status(sparse=True)
    listed = {(cg["path"], controller, type_name) for cg in sparse["cgroups"]
              for controller in sparse["controllers"] if controller in cg
              for type_name in cg[controller]}
    assert listed == {("/", "encids", "sev"), ("/", "misc", "sev"),
                      ("/limited", "encids", "sev_es"),
                      ("/holding", "encids", "sev"), ("/holding", "misc", "sev"),
                      ("/refused", "misc", "sev")}
    assert [cg["path"] for cg in sparse["cgroups"]] == [cg["path"] for cg in full["cgroups"]]
    for sparse_cg, full_cg in zip(sparse["cgroups"], full["cgroups"]):
        # No processes and not populated, as a new cgroup: said by leaving them out.
        assert {key: value for key, value in sparse_cg.items()
                if key not in full["controllers"]} == \
            {key: value for key, value in full_cg.items()
             if key not in full["controllers"] and value not in ([], False)}
        for controller in full["controllers"]:
            assert (controller in sparse_cg) == (controller in full_cg)
            for type_name in full["capacities"] if controller in full_cg else ():
                assert figures(sparse, sparse_cg, controller, type_name) == \
                    full_cg[controller][type_name]
    assert {k: v for k, v in sparse.items() if k != "cgroups"} == \
        {k: v for k, v in full.items() if k != "cgroups"}
    assert {"path": "/new", "encids": {}, "misc": {}} in sparse["cgroups"]
    holding = next(cg for cg in full["cgroups"] if cg["path"] == "/holding")
    assert {"path": "/holding", "procs": [holder.pid], "populated": True,
            "encids": {"sev": holding["encids"]["sev"]},
            "misc": {"sev": holding["misc"]["sev"]}} in sparse["cgroups"]


# -- group commits --------------------------------------------------------------------------

# Allocates one sev ID at a time until refused, prints what it got, and holds it until its
# stdin closes.
GRABBER = r"""
import errno, sys
from encidfs.client import Client, ControlError
got = []
with Client.connect(mount=sys.argv[1]) as client:
    sys.stdin.readline()  # all together
    while True:
        try:
            got += client.allocate("sev")
        except ControlError as error:
            if error.errno != errno.EBUSY:
                raise
            break
print(" ".join(map(str, got)), flush=True)
sys.stdin.read()
"""


def test_concurrent_allocations_come_back_from_the_journal_as_answered(encidfs_factory):
    """Requests of many clients are committed in groups, and applied in the journal's order:
    every ID is handed out once, and what each client was told (the IDs, the refusals at the
    end) is what a daemon killed right after replays from its journal."""
    mount = encidfs_factory(capacity={"sev": 64, "sev_es": 4}, state=True)
    grabbers = [subprocess.Popen([sys.executable, "-c", GRABBER, str(mount.path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(8)]
    try:
        for grabber in grabbers:
            grabber.stdin.write("go\n")
            grabber.stdin.flush()
        told = {grabber.pid: sorted(map(int, grabber.stdout.readline().split()))
                for grabber in grabbers}
        assert sorted(i for ids in told.values() for i in ids) == list(range(1, 65))
        mount.restart()
        with mount.client() as client:
            held = {h["pid"]: sorted(h["ids"]) for h in client.status()["holders"]
                    if h["type"] == "sev"}
        assert held == {pid: ids for pid, ids in told.items() if ids}
    finally:
        for grabber in grabbers:
            grabber.stdin.close()
            grabber.wait(timeout=DEADLINE)
            grabber.stdout.close()
