"""Capacities from the host (encidfs/host/capacity.py), against fake hosts: a sysfs tree, a
cgroup2 root with misc.capacity, and a cpuid device file holding leaf Fn8000_001F at its
offset."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from encidfs.daemon import config
from encidfs.host.capacity import (
    CPUID_SEV,
    CPUID_SEV_ES,
    CPUID_SEV_LEAF,
    Detected,
    Host,
    detect,
    snp_asids,
    tdx_unseen,
)


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = Host((str(root / "sys/fs/cgroup"),),
                         str(root / "sys/module/kvm_amd/parameters"),
                         str(root / "dev/cpu/0/cpuid"),
                         str(root / "sys/module/kvm_intel/parameters"))

    def misc_capacity(self, text: str) -> None:
        path = self.root / "sys/fs/cgroup/misc.capacity"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def kvm_amd(self, **parameters: str) -> None:
        self._parameters("kvm_amd", parameters)

    def kvm_intel(self, **parameters: str) -> None:
        self._parameters("kvm_intel", parameters)

    def _parameters(self, module: str, parameters: dict[str, str]) -> None:
        directory = self.root / "sys/module" / module / "parameters"
        directory.mkdir(parents=True, exist_ok=True)
        for name, value in parameters.items():
            (directory / name).write_text(value + "\n")

    def cpuid(self, eax: int, ecx: int, edx: int) -> None:
        """The cpuid device reads a leaf at the offset of its number (a sparse file here)."""
        path = self.root / "dev/cpu/0/cpuid"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.seek(CPUID_SEV_LEAF)
            f.write(struct.pack("<4I", eax, 0x33, ecx, edx))


@pytest.fixture
def fake(tmp_path):
    return FakeHost(tmp_path)


SEV_AND_ES = CPUID_SEV | CPUID_SEV_ES


def test_the_host_kernels_misc_capacity_comes_first(fake):
    fake.misc_capacity("sev 410\nsev_es 99\n")
    fake.kvm_amd(sev="Y", sev_es="Y")
    fake.cpuid(SEV_AND_ES, ecx=509, edx=100)
    assert detect(fake.host) == Detected({"sev": 410, "sev_es": 99}, {"sev": 100, "sev_es": 1},
                                         f"{fake.root}/sys/fs/cgroup/misc.capacity")


def test_misc_capacity_without_sev_es_leaves_it_at_zero(fake):
    fake.misc_capacity("sev 509\n")
    detected = detect(fake.host)
    assert detected.capacities == {"sev": 509, "sev_es": 0}
    assert detected.first_ids == {"sev_es": 1, "sev": 1}


def test_a_misc_capacity_without_encryption_ids_is_no_answer(fake):
    fake.misc_capacity("res_a 10\n")
    assert detect(fake.host) is None


def test_a_tdx_host_has_tdx_alone(fake):
    """KVM (kvm_intel tdx=Y) registers its TDX KeyIDs, less the TDX module's own, as `tdx`."""
    fake.misc_capacity("tdx 31\n")
    fake.kvm_intel(tdx="Y")
    detected = detect(fake.host)
    assert detected == Detected({"tdx": 31}, {"tdx": 1},
                                f"{fake.root}/sys/fs/cgroup/misc.capacity")
    assert tdx_unseen(fake.host, detected.capacities) is None


def test_every_type_is_taken_in_the_kernels_order_with_ids_unique_across_them(fake):
    fake.misc_capacity("tdx 7\nres_a 3\nsev_es 4\nsev 11\n")
    detected = detect(fake.host)
    assert list(detected.capacities.items()) == [("sev", 11), ("sev_es", 4), ("tdx", 7)]
    assert detected.first_ids == {"sev_es": 1, "sev": 5, "tdx": 16}


def test_a_type_listed_without_ids_is_left_out(fake):
    """The kernel lists only types with IDs; one listed as 0 counts as not listed."""
    fake.misc_capacity("sev 9\ntdx 0\n")
    assert detect(fake.host).capacities == {"sev": 9, "sev_es": 0}
    fake.misc_capacity("tdx 0\n")
    assert detect(fake.host) is None


@pytest.mark.parametrize("case, misc_capacity", [
    ("no misc.capacity in sight", None),
    ("misc.capacity without tdx", "res_a 10\n"),
    ("misc.capacity with tdx 0", "tdx 0\n"),
])
def test_tdx_enabled_in_kvm_intel_but_not_in_misc_capacity_is_said(fake, monkeypatch, case,
                                                                    misc_capacity):
    fake.kvm_intel(tdx="Y")
    if misc_capacity is not None:
        fake.misc_capacity(misc_capacity)
    found = load(monkeypatch, fake.root)
    assert "tdx" not in found.capacities, case
    assert found.capacity_notes == [
        f"kvm_intel has TDX enabled ({fake.root}/sys/module/kvm_intel/parameters/tdx) but no "
        "misc.capacity this daemon can read lists tdx IDs: the mount has no tdx (give "
        "--capacity tdx=N)"], case


def test_no_note_without_tdx_in_kvm_intel_or_with_tdx_given(fake, monkeypatch):
    assert load(monkeypatch, fake.root).capacity_notes == []
    fake.kvm_intel(tdx="N")
    assert load(monkeypatch, fake.root).capacity_notes == []
    fake.kvm_intel(tdx="Y")
    assert load(monkeypatch, fake.root, "tdx=31").capacity_notes == []  # not detected


def test_cpuid_split_as_kvm_does(fake):
    """sev_hardware_setup(): SEV guests use ASIDs EDX..ECX, SEV-ES guests 1..EDX-1."""
    fake.kvm_amd(sev="Y", sev_es="Y")
    fake.cpuid(SEV_AND_ES, ecx=509, edx=100)
    detected = detect(fake.host)
    assert detected.capacities == {"sev": 410, "sev_es": 99}
    assert detected.first_ids == {"sev": 100, "sev_es": 1}
    assert detected.source.startswith("CPUID Fn8000_001F")


@pytest.mark.parametrize("case, setup", [
    ("sev_es disabled in kvm_amd", lambda f: (f.kvm_amd(sev="Y", sev_es="N"),
                                              f.cpuid(SEV_AND_ES, 509, 100))),
    ("no SEV-ES in the CPU", lambda f: (f.kvm_amd(sev="1", sev_es="1"),
                                        f.cpuid(CPUID_SEV, 509, 100))),
    ("no ASIDs kept for SEV-ES", lambda f: (f.kvm_amd(sev="Y", sev_es="Y"),
                                            f.cpuid(SEV_AND_ES, 509, 1))),
])
def test_without_sev_es_its_capacity_is_zero(fake, case, setup):
    setup(fake)
    assert detect(fake.host).capacities["sev_es"] == 0, case


@pytest.mark.parametrize("case, setup", [
    ("SEV disabled in kvm_amd", lambda f: (f.kvm_amd(sev="N", sev_es="N"),
                                           f.cpuid(SEV_AND_ES, 509, 100))),
    ("no kvm_amd", lambda f: f.cpuid(SEV_AND_ES, 509, 100)),
    ("no cpuid device", lambda f: f.kvm_amd(sev="Y", sev_es="Y")),
    ("no SEV in the CPU", lambda f: (f.kvm_amd(sev="Y"), f.cpuid(0, 509, 100))),
    ("no ASIDs", lambda f: (f.kvm_amd(sev="Y"), f.cpuid(SEV_AND_ES, 0, 0))),
    ("a minimum above the maximum", lambda f: (f.kvm_amd(sev="Y"),
                                               f.cpuid(SEV_AND_ES, 5, 9))),
    ("nothing at all", lambda f: None),
])
def test_no_answer(fake, case, setup):
    setup(fake)
    assert detect(fake.host) is None, case


def load(monkeypatch, root: Path, *capacities: str, asids=None, min_sev_asid=None,
         path=None, snp_asids=None) -> config.Config:
    monkeypatch.setenv("ENCIDFS_HOST_ROOT", str(root))
    return config.load(path, list(capacities), asids, min_sev_asid, [], snp_asids=snp_asids)


def test_the_host_is_used_unless_capacities_are_given(fake, monkeypatch, tmp_path):
    fake.kvm_amd(sev="Y", sev_es="Y")
    fake.cpuid(SEV_AND_ES, ecx=15, edx=5)
    found = load(monkeypatch, fake.root)
    assert (found.capacities, found.first_ids) == ({"sev": 11, "sev_es": 4},
                                                   {"sev": 5, "sev_es": 1})
    assert found.capacity_source.startswith("CPUID")
    assert load(monkeypatch, fake.root, "auto").capacities == found.capacities
    given = load(monkeypatch, fake.root, "sev=3")
    assert (given.capacities, given.capacity_source) == ({"sev": 3}, "--capacity")
    asids = load(monkeypatch, fake.root, asids=9, min_sev_asid=3)
    assert (asids.capacities, asids.capacity_source) == ({"sev": 7, "sev_es": 2}, "--asids")
    toml = tmp_path / "encidfs.toml"
    toml.write_text("[capacity]\ntdx = 7\n")
    from_file = load(monkeypatch, fake.root, path=str(toml))
    assert (from_file.capacities, from_file.capacity_source) == ({"tdx": 7}, str(toml))
    assert load(monkeypatch, fake.root, "auto", path=str(toml)).capacities == found.capacities


def test_without_an_answer_the_defaults_say_so(fake, monkeypatch):
    found = load(monkeypatch, fake.root)
    assert found.capacities == config.DEFAULT_CAPACITIES and found.first_ids is None
    assert found.capacity_source.startswith("defaults: ")


# -- SEV-SNP: kvm_amd's sev_snp and ciphertext_hiding_asids, as sev_hardware_setup() leaves them

@pytest.mark.parametrize("parameters, expected", [
    ({"sev_snp": "Y", "ciphertext_hiding_asids": "16"}, 16),  # Linux 6.18, ciphertext hiding
    ({"sev_snp": "Y", "ciphertext_hiding_asids": "0"}, 0),  # without: SNP shares SEV-ES's
    ({"sev_snp": "Y"}, 0),  # before 6.18
    ({"sev_snp": "N", "ciphertext_hiding_asids": "16"}, None),  # the host runs no SNP guests
    ({}, None),  # before 6.11: KVM ran no SNP guests
])
def test_snp_asids_from_kvm_amd(fake, parameters, expected):
    fake.kvm_amd(sev="Y", sev_es="Y", **parameters)
    assert snp_asids(fake.host) == expected


def snp_host(fake, **parameters):
    """An AMD host with ASIDs 1..15, SEV from 5, and kvm_amd's SNP parameters as given."""
    fake.kvm_amd(sev="Y", sev_es="Y", **parameters)
    fake.cpuid(SEV_AND_ES, ecx=15, edx=5)


def test_detected_capacities_come_with_the_hosts_snp_split(fake, monkeypatch):
    snp_host(fake, sev_snp="Y", ciphertext_hiding_asids="3")
    found = load(monkeypatch, fake.root)
    assert found.snp_asids == 3
    assert found.layout() == {"capacities": {"sev": 11, "sev_es": 4},
                              "first_ids": {"sev": 5, "sev_es": 1}, "snp_asids": 3}


def test_without_snp_guests_or_ciphertext_hiding_the_layout_is_as_before(fake, monkeypatch):
    """A state file of a release without SNP guests is good for such a host."""
    snp_host(fake, sev_snp="N")
    off = load(monkeypatch, fake.root)
    snp_host(fake, sev_snp="Y", ciphertext_hiding_asids="0")
    shared = load(monkeypatch, fake.root)
    assert (off.snp_asids, shared.snp_asids) == (None, 0)
    assert off.layout() == shared.layout() == {"capacities": {"sev": 11, "sev_es": 4},
                                               "first_ids": {"sev": 5, "sev_es": 1}}


def test_given_snp_asids_win_over_the_hosts_and_are_capped(fake, monkeypatch, tmp_path):
    snp_host(fake, sev_snp="Y", ciphertext_hiding_asids="3")
    assert load(monkeypatch, fake.root, snp_asids=1).snp_asids == 1
    toml = tmp_path / "encidfs.toml"
    toml.write_text("snp_asids = 0\n")
    assert load(monkeypatch, fake.root, path=str(toml)).snp_asids == 0
    assert load(monkeypatch, fake.root, path=str(toml), snp_asids=2).snp_asids == 2
    # As kvm_amd caps ciphertext_hiding_asids: -1u gives SNP guests every SEV-ES ID.
    assert load(monkeypatch, fake.root, snp_asids=2**32 - 1).snp_asids == 4


def test_snp_guests_share_unless_told_where_the_capacities_are_not_the_hosts(fake, monkeypatch):
    snp_host(fake, sev_snp="Y", ciphertext_hiding_asids="3")
    assert load(monkeypatch, fake.root, asids=9, min_sev_asid=3).snp_asids == 0
    assert load(monkeypatch, fake.root, asids=9, min_sev_asid=3, snp_asids=1).snp_asids == 1
    assert load(monkeypatch, fake.root / "nothing").snp_asids == 0  # the defaults


@pytest.mark.parametrize("value", [-1, 2**32, True, "16"])
def test_a_malformed_snp_asids_is_one_error(fake, monkeypatch, tmp_path, value):
    with pytest.raises(config.ConfigError, match="snp_asids"):
        load(monkeypatch, fake.root, snp_asids=value)
    toml = tmp_path / "encidfs.toml"
    toml.write_text(f"snp_asids = {value!r}\n".replace("True", "true").replace("'", '"'))
    with pytest.raises(config.ConfigError, match="snp_asids"):
        load(monkeypatch, fake.root, path=str(toml))
