"""--kernel-interface, kernel_interface in the TOML file: which kernel's misc a mount shows,
and the one-line errors for what is not a kernel version with misc (no mount here:
tests/mount/test_kernel_interface.py mounts them)."""

import pytest

from encidfs.cli import main as cli
from encidfs.daemon import config
from encidfs.engine.kernel import KernelInterface

CAPACITY = ["sev=4"]  # given, so that nothing is detected on this host


def load(**kwargs):
    return config.load(None, CAPACITY, None, None, [], **kwargs)


@pytest.mark.parametrize("text, version", [
    ("5.13", (5, 13)), ("5.14", (5, 14)), ("6.1", (6, 1)), ("6.10", (6, 10)), ("7.0", (7, 0)),
    ("6.1.55", (6, 1)),  # a stable release has its mainline's interface
    ("5.14.0-362.8.1.el9_3.x86_64", (5, 14)), ("6.1.0-18-amd64", (6, 1)),  # `uname -r`
    ("5.15.0-91-generic", (5, 15)),
])
def test_a_version_names_a_kernel(text, version):
    assert load(kernel_interface=text).kernel_interface == KernelInterface(version)


def test_by_default_the_newest():
    assert load().kernel_interface == KernelInterface() == KernelInterface((6, 18))
    assert str(KernelInterface()) == "6.18"


@pytest.mark.parametrize("text, message", [
    ("5.12", "kernel interface 5.12 is older than the misc controller (Linux 5.13)"),
    ("4.19.0-26-amd64", "older than the misc controller"),
    ("6", "kernel interface '6' is not a kernel version such as 6.1"),
    ("6.1abc", "not a kernel version"), ("", "not a kernel version"),
    ("v6.1", "not a kernel version"),
])
def test_what_is_not_a_kernel_with_misc_is_refused(text, message):
    with pytest.raises(config.ConfigError) as refused:
        load(kernel_interface=text)
    assert message in str(refused.value)


def test_the_toml_file_takes_a_string(tmp_path):
    path = tmp_path / "encidfs.toml"
    path.write_text('kernel_interface = "6.10"\n')
    assert config.load(str(path), CAPACITY, None, None, []).kernel_interface == \
        KernelInterface((6, 10))
    # The command line overrides the file.
    assert config.load(str(path), CAPACITY, None, None, [],
                       kernel_interface="5.16").kernel_interface == KernelInterface((5, 16))


def test_a_toml_number_is_refused_for_the_zeros_it_loses(tmp_path):
    path = tmp_path / "encidfs.toml"
    path.write_text("kernel_interface = 6.10\n")  # a float: 6.1
    with pytest.raises(config.ConfigError, match='a version in a string, such as "6.1"'):
        config.load(str(path), CAPACITY, None, None, [])


def test_the_command_line_says_so_in_one_line(tmp_path, capsys):
    status = cli.main(["mount", str(tmp_path), "--capacity", "sev=4",
                       "--kernel-interface", "5.10"])
    assert status == 1
    assert capsys.readouterr().err == (
        "encidfs: kernel interface 5.10 is older than the misc controller (Linux 5.13)\n")


@pytest.mark.parametrize("kernel, asked, snp_asids", [
    (None, None, 0), ("6.18", 16, 16), ("6.11", 0, 0), ("6.11", None, 0), ("6.10", None, None),
    ("6.1", 0, None),
])
def test_snp_guests_as_the_chosen_kernels_kvm_has_them(kernel, asked, snp_asids):
    """SEV-SNP guests since 6.11, their own IDs (ciphertext hiding) since 6.18."""
    chosen = config.load(None, ["sev=4", "sev_es=20"], None, None, [], kernel_interface=kernel,
                         snp_asids=asked)
    assert chosen.snp_asids == snp_asids


@pytest.mark.parametrize("kernel, needed", [("6.17", "6.18"), ("6.10", "6.11")])
def test_snp_ids_of_their_own_need_a_kernel_with_ciphertext_hiding(kernel, needed):
    with pytest.raises(config.ConfigError) as refused:
        config.load(None, ["sev=4", "sev_es=20"], None, None, [], kernel_interface=kernel,
                    snp_asids=4)
    assert str(refused.value) == (f"snp_asids (--snp-asids) needs the interface of Linux "
                                  f"{needed} or later, not {kernel}")
