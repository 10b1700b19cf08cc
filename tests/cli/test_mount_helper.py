"""mount(8)'s command lines for a helper, turned into `encidfs mount`'s (no mount here; the
real mount(8) is tried in tests/mount/test_cli.py)."""

import pytest

from encidfs.cli.mount_helper import HelperError, is_helper_call, to_cli

COMMANDS = {"mount", "umount", "status"}


def test_every_setting_has_an_o_spelling():
    assert to_cli(["encidfs", "/run/encidfs", "-o",
                   "capacity=sev:509:sev_es:99,state=/var/lib/encidfs/state.db,"
                   "controllers=encids:misc,tracking=scan,max_cgroups=10,control=/run/c.sock,"
                   "control_mode=0660,control_group=kvm,config=/etc/encidfs.toml"]) == [
        "mount", "/run/encidfs", "--quiet", "--capacity", "sev=509", "--capacity", "sev_es=99",
        "--state", "/var/lib/encidfs/state.db", "--controllers", "encids,misc",
        "--tracking", "scan", "--max-cgroups", "10", "--control", "/run/c.sock",
        "--control-mode", "0660", "--control-group", "kvm", "--config", "/etc/encidfs.toml"]
    assert to_cli(["x", "/m", "-oasids=509,min_sev_asid=100,snp_asids=16"]) == [
        "mount", "/m", "--quiet", "--asids", "509", "--min-sev-asid", "100", "--snp-asids", "16"]
    assert to_cli(["x", "/m", "-o", "capacity=auto"])[3:] == ["--capacity", "auto"]
    assert to_cli(["x", "/m", "-o", "debug,metrics=127.0.0.1:9100"])[3:] == [
        "--debug", "--metrics", "127.0.0.1:9100"]
    assert to_cli(["x", "/m", "-o", "kernel_interface=6.1"])[3:] == ["--kernel-interface", "6.1"]


def test_generic_options_are_accepted_and_the_rest_go_to_fuse():
    generic = ("defaults,rw,auto,noauto,nofail,_netdev,user,users,owner,group,"
               "x-systemd.automount,x-systemd.requires=network.target,comment=systemd.x")
    assert to_cli(["encidfs", "/m", "-n", "-sv", "-o", generic, "-o", "allow_other,ro",
                   "-t", "fuse.encidfs"]) == ["mount", "/m", "--quiet", "-o", "allow_other,ro"]


def test_a_fake_mount_does_nothing():
    assert to_cli(["encidfs", "/m", "-f", "-o", "rw"]) is None


@pytest.mark.parametrize("argv", [
    ["encidfs"], ["encidfs", "/m", "/n"], ["encidfs", "/m", "-x"],
    ["encidfs", "/m", "-o", "capacity=sev:1:sev_es"], ["encidfs", "/m", "-o", "state"],
    ["encidfs", "/m", "-o", "kernel_interface"],
])
def test_what_cannot_be_taken_is_one_error(argv):
    with pytest.raises(HelperError):
        to_cli(argv)


def test_a_helper_call_is_told_by_the_programs_name_or_a_source_for_a_command():
    assert is_helper_call("mount.fuse.encidfs", ["encidfs", "/m"], COMMANDS)
    assert is_helper_call("encidfs", ["encidfs", "/m", "-o", "rw"], COMMANDS)
    assert not is_helper_call("encidfs", ["mount", "/m"], COMMANDS)
    assert not is_helper_call("encidfs", ["--help"], COMMANDS)
    assert not is_helper_call("encidfs", [], COMMANDS)
