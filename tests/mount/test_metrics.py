"""Prometheus metrics (`mount --metrics ADDRESS:PORT`): the text `promtool check metrics`
accepts, and a real Prometheus server (Debian's package) scraping the daemon on loopback, asked
through its HTTP API with PromQL."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest
from mountutil import DEADLINE, wait_until, write

from encidfs.client import Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture
def exported(mount_encidfs, procs):
    """A mount with metrics, /a limited to 2 sev IDs, a sleep in /a holding one, and one
    refusal counted there."""
    port = free_port()
    mnt = mount_encidfs("--metrics", f"127.0.0.1:{port}")
    write(mnt / "cgroup.subtree_control", "+encids")
    (mnt / "a").mkdir()
    write(mnt / "a/encids.sev.max", "2")
    sleeper = procs.sleep()
    write(mnt / "a/cgroup.procs", str(sleeper.pid))
    with Client.connect(mount=str(mnt)) as client:
        client.allocate("sev", pid=sleeper.pid)
        with pytest.raises(OSError):
            client.allocate("sev", 2, pid=sleeper.pid)
    return mnt, port


def test_the_metrics_say_what_the_files_say(exported):
    mnt, port = exported
    found = samples(scrape(port))
    key = 'cgroup="/a",controller="encids",type="sev"'
    assert found[f"encidfs_cgroup_current{{{key}}}"] == 1
    assert found[f"encidfs_cgroup_max{{{key}}}"] == 2
    assert found[f"encidfs_cgroup_peak{{{key}}}"] == 1
    assert found[f"encidfs_cgroup_refusals_total{{{key}}}"] == 1
    assert found['encidfs_cgroup_max{cgroup="/",controller="encids",type="sev"}'] == float("inf")
    assert found['encidfs_capacity{type="sev"}'] == 509
    assert found['encidfs_used{type="sev"}'] == 1
    assert found["encidfs_cgroups"] == 2 and found["encidfs_member_processes"] == 1
    assert found["encidfs_daemon_restarts_total"] == 0
    assert found['encidfs_requests_total{interface="control",kind="allocate"}'] == 2
    assert found['encidfs_requests_total{interface="fuse",kind="mkdir"}'] == 1
    assert found['encidfs_request_duration_seconds_count{interface="fuse",kind="mkdir"}'] == 1


def test_promtool_accepts_the_metrics(exported):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (package prometheus)")
    _, port = exported
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape(port),
                           capture_output=True, text=True, timeout=DEADLINE)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", "")


@pytest.mark.slow
def test_a_prometheus_server_scrapes_the_daemon(exported, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (package prometheus)")
    _, port = exported
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML takes JSON
        "global": {"scrape_interval": "100ms"},
        "scrape_configs": [{"job_name": "encidfs",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.quote('encidfs_cgroup_current{cgroup="/a",controller="encids"}')

        def current():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/query?query={query}",
                                            timeout=DEADLINE) as reply:
                    result = json.load(reply)["data"]["result"]
            except OSError:
                return None  # not listening yet
            return [(r["metric"]["type"], r["value"][1]) for r in result] or None

        assert sorted(wait_until(current, "Prometheus to scrape the daemon", timeout=30)) == [
            ("sev", "1"), ("sev_es", "0")]
    finally:
        server.terminate()
        server.wait(timeout=DEADLINE)
