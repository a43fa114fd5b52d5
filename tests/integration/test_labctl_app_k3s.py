"""`labctl app k3s install|health|list` against a real `lab-bastion serve --no-dnsmasq`.

Machines are made installed the way real ones get there (discover, install, GET /dispatch for the
install token, POST /api/progress complete), so they come back from the bastion with IP 127.0.0.1.
The CLI runs as a subprocess; the inventory is the collection's lab.platform.lab plugin, read with
ansible-inventory and by ansible-playbook through ansible-runner.

A k3s binary cannot be had here and real hosts are not reachable: the playbooks really run, but
every host is 127.0.0.1 on a port that is bound and never listening (`-e ansible_port=`), with a
user that does not exist, so SSH is refused at once and each host is UNREACHABLE: nothing ever
runs on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import Machines, start_bastion

LABCTL = [sys.executable, "-m", "labctl.main"]
SSH_USER = "labctl-k3s-test-nobody"


def labctl(env: dict, *args: str, timeout: float = 50) -> subprocess.CompletedProcess:
    return subprocess.run([*LABCTL, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def make_env(bastion, home: Path) -> dict:
    return {"LABCTL_HOME": str(home), "LABCTL_CONFIG": str(home / "config.yaml"), "LABCTL_BASTION_URL": bastion.url,
            "LABCTL_TOKEN": bastion.token, "LABCTL_OUTPUT": ""}


def installed(machines: Machines, mac: str, host: str, role: str) -> None:
    machines.discover(mac)
    r = machines.http.post(machines.b.url + "/api/install", json={"mac": mac, "hostname": host, "role": role,
                                                                 "os": "fedora-43"}, timeout=10)
    assert r.status_code == 202, r.text
    machines.progress(mac, machines.boot(mac), "complete", 100)


def mac_of(n: int) -> str:
    return f"52:54:00:6b:00:{n:02x}"


@pytest.fixture(scope="module")
def fleet(bastion):
    """Three servers (infra, infra, labcontroller), one agent, one vanilla machine (not k3s), one
    machine only queued (not installed, so not in the inventory)."""
    m = Machines(bastion)
    for n, host, role in ((1, "k3s-a", "infra"), (2, "k3s-b", "infra"), (3, "k3s-c", "labcontroller"),
                          (4, "k3s-w1", "worker"), (5, "plain", "vanilla")):
        installed(m, mac_of(n), host, role)
    m.discover(mac_of(6))
    r = m.http.post(bastion.url + "/api/install", json={"mac": mac_of(6), "hostname": "k3s-w2", "role": "worker",
                                                        "os": "fedora-43"}, timeout=10)
    assert r.status_code == 202, r.text
    for n in range(1, 6):  # every host the playbooks may see is on loopback, never elsewhere
        assert m.api(f"/api/machines/{mac_of(n)}")[1]["ip"] == "127.0.0.1"
    return m


@pytest.fixture(scope="module")
def closed_port():
    """A loopback port that is bound but never listens: connections to it are refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def env(bastion, tmp_path):
    return make_env(bastion, tmp_path / "home")


def test_list_every_format(env, fleet, bastion):
    p = labctl(env, "app", "k3s", "list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SERVERS", "AGENTS", "BASTION"]
    assert lines[1].split() == ["lab", "3", "1", bastion.url]
    assert len(lines) == 2

    p = labctl(env, "app", "k3s", "list", "-o", "wide")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1].split() == ["lab", "3", "1", bastion.url, "k3s-a,k3s-b,k3s-c", "k3s-w1"]

    p = labctl(env, "-o", "json", "app", "k3s", "list")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    [c] = doc["clusters"]
    assert c["name"] == "lab" and c["bastion"] == bastion.url
    assert [(h["name"], h["role"], h["mac"], h["ip"]) for h in c["servers"]] == [
        ("k3s-a", "infra", mac_of(1), "127.0.0.1"), ("k3s-b", "infra", mac_of(2), "127.0.0.1"),
        ("k3s-c", "labcontroller", mac_of(3), "127.0.0.1")]
    assert [h["name"] for h in c["agents"]] == ["k3s-w1"]

    p = labctl(env, "app", "k3s", "list", "-o", "yaml")
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout) == doc


def test_list_bastion_unreachable_and_bad_token(env, fleet, closed_port):
    p = labctl({**env, "LABCTL_BASTION_URL": f"http://127.0.0.1:{closed_port}"}, "app", "k3s", "list")
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "cannot reach the bastion" in p.stderr and "Traceback" not in p.stderr
    p = labctl({**env, "LABCTL_TOKEN": "wrong-token-0123456789"}, "app", "k3s", "list")
    assert p.returncode == 4, (p.stdout, p.stderr)


def test_targets_validated_before_running(env, fleet, tmp_path):
    p = labctl(env, "app", "k3s", "install", "k3s-nope")
    assert p.returncode == 5, (p.stdout, p.stderr)
    assert "no machine matches 'k3s-nope'" in p.stderr and "did you mean" in p.stderr
    p = labctl(env, "app", "k3s", "health", "k3s-w2")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "k3s-w2 is install_queued, not installed" in p.stderr
    p = labctl(env, "app", "k3s", "install", "plain")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "plain has role vanilla" in p.stderr
    p = labctl(env, "app", "k3s", "install", "-e", "not a key=1")
    assert p.returncode == 2 and "invalid -e" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = labctl(env, "app", "k3s", "install", "--airgap-dir", str(empty))
    assert p.returncode == 2 and "has no k3s binary" in p.stderr
    (empty / "k3s").write_bytes(b"not really k3s\n")
    (empty / "cilium-1.16.5.tgz").write_bytes(b"")
    p = labctl(env, "app", "k3s", "install", "--airgap-dir", str(empty))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "has no Cilium images (cilium-images*.tar[.gz|.zst], or --cilium-images FILE)" in p.stderr
    assert "no node would get a CNI" in p.stderr
    p = labctl(env, "app", "k3s", "install", "--cluster", "bad name!")
    assert p.returncode == 2 and "invalid --cluster" in p.stderr
    assert not (Path(env["LABCTL_HOME"]) / "runs").exists()  # nothing ran


def test_no_server_and_even_servers_refused(tmp_path):
    b = start_bastion(tmp_path / "data", workers=1)
    try:
        m = Machines(b)
        env = make_env(b, tmp_path / "home")
        installed(m, mac_of(0x10), "lone-worker", "worker")
        p = labctl(env, "app", "k3s", "install")
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert "no k3s server: the bastion has no installed infra or labcontroller machine" in p.stderr
        p = labctl(env, "app", "k3s", "health")
        assert p.returncode == 2 and "no k3s server" in p.stderr
        p = labctl(env, "app", "k3s", "list", "-o", "json")
        assert p.returncode == 0, p.stderr
        assert [(c["servers"], [h["name"] for h in c["agents"]]) for c in json.loads(p.stdout)["clusters"]] == [
            ([], ["lone-worker"])]

        installed(m, mac_of(0x11), "srv1", "infra")
        installed(m, mac_of(0x12), "srv2", "labcontroller")
        p = labctl(env, "app", "k3s", "install", "lone-worker")
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert "2 k3s servers (srv1, srv2): embedded etcd needs an odd number of servers" in p.stderr
        assert not (tmp_path / "home" / "runs").exists()  # nothing ran
    finally:
        b.stop()


def _run_dir(home: Path, what: str) -> Path:
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1 and f"-k3s-{what}-" in runs[0].name, runs
    return runs[0]


def test_install_runs_k3s_yml_every_host_unreachable(env, fleet, bastion, closed_port, tmp_path):
    airgap = tmp_path / "airgap"
    airgap.mkdir()
    (airgap / "k3s").write_bytes(b"not really k3s\n")
    (airgap / "k3s-airgap-images-amd64.tar.zst").write_bytes(b"")
    (airgap / "cilium-1.16.5.tgz").write_bytes(b"")
    (airgap / "cilium-images.tar.zst").write_bytes(b"")
    extra_images = tmp_path / "cilium-envoy.tar"
    extra_images.write_bytes(b"")
    p = labctl(env, "app", "k3s", "install", "--cluster", "edge", "--airgap-dir", str(airgap), "--ssh-user", SSH_USER,
               "--cilium-images", str(extra_images), "-e", f"ansible_port={closed_port}")
    assert p.returncode == 14, (p.stdout, p.stderr)  # 10 + ansible-playbook rc 4 (hosts unreachable)
    out = p.stdout
    assert "PLAY [Sort the inventory into k3s servers and agents]" in out
    assert "PLAY [Prepare the k3s hosts]" in out and "TASK [Gathering Facts]" in out
    for host in ("k3s-a", "k3s-b", "k3s-c", "k3s-w1"):
        assert f"unreachable: {host}: " in out, out
    assert "unreachable: plain" not in out and "k3s-w2" not in out
    assert "unreachable=4" in out and "failed=0" in out
    assert "k3s install ended failed (ansible rc 4; failed=0 unreachable=4)" in p.stderr

    run = _run_dir(Path(env["LABCTL_HOME"]), "install")
    stdout = next(run.glob("artifacts/*/stdout")).read_text()
    assert stdout.count("UNREACHABLE!") == 4 and "Connection refused" in stdout
    assert list(run.glob("artifacts/*/job_events/*.json"))
    assert yaml.safe_load((run / "inventory" / "lab.yml").read_text())["sources"] == [bastion.url]
    extravars = json.loads((run / "env" / "extravars").read_text())
    assert extravars["k3s_server_cluster_name"] == "edge" and extravars["ansible_port"] == closed_port
    assert extravars["k3s_server_airgap_binary"] == str(airgap / "k3s")
    assert extravars["k3s_agent_airgap_images"] == [str(airgap / "k3s-airgap-images-amd64.tar.zst")]
    assert extravars["k3s_networking_airgap_enabled"] is True
    assert extravars["k3s_networking_cilium_chart_archive"] == str(airgap / "cilium-1.16.5.tgz")
    assert extravars["k3s_networking_cilium_images"] == [str(airgap / "cilium-images.tar.zst"), str(extra_images)]
    for f in run.rglob("*"):  # the operator token is handed over in the environment only
        if f.is_file():
            assert bastion.token not in f.read_text(errors="replace"), f


def test_health_limited_to_a_target_json(env, fleet, closed_port):
    p = labctl(env, "app", "k3s", "health", mac_of(2), "-o", "json", "--ssh-user", SSH_USER,
               "-e", f"ansible_port={closed_port}")
    assert p.returncode == 14, (p.stdout, p.stderr)
    doc = json.loads(p.stdout)  # quiet run: only the result document on stdout
    assert doc["playbook"] == "k3s_health.yml" and doc["status"] == "failed" and doc["rc"] == 4
    assert doc["exit_code"] == 14 and doc["limit"] == "k3s-b"
    assert doc["stats"]["unreachable"] == 1 and doc["stats"]["ok"] == 0
    run = _run_dir(Path(env["LABCTL_HOME"]), "health")
    assert doc["run_dir"] == str(run)
    stdout = next(run.glob("artifacts/*/stdout")).read_text()
    assert "TASK [Read the k3s service state]" in stdout
    assert "fatal: [k3s-b]: UNREACHABLE!" in stdout and "k3s-a" not in stdout



def test_install_check_mode_passes_check_to_ansible(env, fleet, closed_port):
    p = labctl(env, "app", "k3s", "install", mac_of(2), "--check", "-o", "json", "--ssh-user", SSH_USER,
               "-e", f"ansible_port={closed_port}")
    assert p.returncode == 14, (p.stdout, p.stderr)
    run = Path(json.loads(p.stdout)["run_dir"])
    command = json.loads(next(run.glob("artifacts/*/command")).read_text())["command"]
    assert "--check" in command and "--diff" in command
