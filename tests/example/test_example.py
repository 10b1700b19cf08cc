"""A project's own tests against encidfs, as the README shows them: they use only the plugin
installed with encidfs (no conftest), and pass as root and as any user with a usable
/dev/fuse."""

import errno

import pytest

from encidfs.client import ControlError


def test_a_vm_over_its_cgroups_limit_is_refused(encidfs):
    (encidfs.path / "cgroup.subtree_control").write_text("+encids +misc")
    (encidfs.path / "vm").mkdir()
    (encidfs.path / "vm" / "misc.max").write_text("sev 1")
    vm = encidfs.run("sleep", "600", cgroup="/vm")  # holds one sev ID while it runs
    try:
        assert (encidfs.path / "vm" / "misc.current").read_text() == "sev 1\nsev_es 0\n"
        with encidfs.client() as client, pytest.raises(ControlError) as refused:
            client.allocate("sev", pid=vm.pid)
        assert (refused.value.controller, refused.value.cgroup) == ("misc", "/vm")
    finally:
        vm.kill()
        vm.wait()


def test_a_vm_refused_by_its_cgroups_limit_never_starts(encidfs, tmp_path):
    (encidfs.path / "cgroup.subtree_control").write_text("+misc")
    (encidfs.path / "vm").mkdir()
    (encidfs.path / "vm" / "misc.max").write_text("sev 0")
    started = tmp_path / "started"
    with pytest.raises(ControlError) as refused:
        encidfs.run("touch", str(started), cgroup="/vm")
    assert (refused.value.errno, refused.value.type, refused.value.cgroup,
            refused.value.controller) == (errno.EBUSY, "sev", "/vm", "misc")
    assert not started.exists()
    assert (encidfs.path / "vm" / "misc.events.local").read_text() == "sev.max 1\nsev_es.max 0\n"


def test_a_small_host_keeps_its_books_across_a_restart(encidfs_factory):
    mount = encidfs_factory(capacity={"sev": 4, "sev_es": 2}, controllers=["misc"], state=True)
    assert (mount.path / "misc.capacity").read_text() == "sev 4\nsev_es 2\n"
    (mount.path / "cgroup.subtree_control").write_text("+misc")
    (mount.path / "tenant").mkdir()
    (mount.path / "tenant" / "misc.max").write_text("sev 2")
    mount.restart()
    assert (mount.path / "tenant" / "misc.max").read_text() == "sev 2\nsev_es max\n"


@pytest.mark.encidfs(controllers=["encids"])
def test_the_marker_configures_the_mount(encidfs):
    assert (encidfs.path / "cgroup.controllers").read_text() == "encids\n"


@pytest.mark.encidfs(kernel_interface="5.15")  # Ubuntu 22.04's: no misc.events or misc.peak
def test_the_marker_chooses_the_kernel_whose_misc_files_the_mount_has(encidfs):
    (encidfs.path / "cgroup.subtree_control").write_text("+misc")
    (encidfs.path / "vm").mkdir()
    assert sorted(p.name for p in encidfs.path.glob("misc.*")) == ["misc.capacity"]
    assert sorted(p.name for p in (encidfs.path / "vm").glob("misc.*")) == [
        "misc.current", "misc.max"]


def test_software_that_insists_on_sys_fs_cgroup(encidfs):
    done = encidfs.exec("sh", "-c", "cat /sys/fs/cgroup/cgroup.controllers && "
                        "mkdir /sys/fs/cgroup/pod && "
                        "echo +misc > /sys/fs/cgroup/cgroup.subtree_control",
                        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "encids misc\n"
    assert (encidfs.path / "pod").is_dir()
    assert (encidfs.path / "pod" / "misc.max").exists()


def test_tools_that_ask_the_kernel_take_the_mount(encidfs):
    done = encidfs.exec("stat", "-f", "-c", "%T", "/sys/fs/cgroup", capture_output=True,
                        text=True)
    assert done.stdout == "cgroup2fs\n", done.stderr
    tables = encidfs.exec("grep", " /sys/fs/cgroup ", "/proc/self/mounts", mounts=True,
                          capture_output=True, text=True)
    assert tables.stdout.startswith("cgroup2 /sys/fs/cgroup cgroup2 "), tables.stderr
    (encidfs.path / "pod").mkdir()
    own = encidfs.exec("sh", "-c", "echo $$ > /sys/fs/cgroup/pod/cgroup.procs && "
                       "cat /proc/self/cgroup", proc_cgroup=True, capture_output=True, text=True)
    assert own.stdout == "0::/pod\n", own.stderr
