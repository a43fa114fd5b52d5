"""What a new user gets from `pip install` of the wheel (no checkout, no test extras) and from the
collection installed by `ansible-galaxy`: `labctl provision reprovision|cancel` and `labctl init
bastion wheelhouse` from the installed labctl, and the AWX/Semaphore/ansible-playbook reprovision path,
against a real `lab-bastion serve` and a real SSH host (sshd in a network namespace,
tests/support.py SshHost; its systemd-run only records the reboot).

The wheel is built the way a user builds it (`labctl init bastion wheelhouse`: `pip wheel --no-deps`
of the checkout plus its requirements' wheels, cached in /var/cache/lab-platform/wheelhouse) and
installed into a fresh virtualenv with `pip install --no-index --find-links` that wheelhouse, so the
install needs nothing the wheel does not declare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from tests.support import BIN, REPO, SshHost, ansible_env, run, start_bastion

MACHINES = {  # the machines of the bastion, one per test (state installed, at the SSH host's address)
    "node1": "52:54:00:cc:00:01",  # labctl provision reprovision: check, queue, reboot
    "node2": "52:54:00:cc:00:02",  # the playbook fails after the queue: message, then cancel
    "node3": "52:54:00:cc:00:03",  # not reachable: the check fails and nothing is queued
    "node4": "52:54:00:cc:00:04",  # awx_reprovision.yml with the installed collection
    "node5": "52:54:00:cc:00:05",  # reprovision.yml on a machine whose reinstall is not queued
    "node6": "52:54:00:cc:00:06",  # awx_reprovision.yml as Semaphore runs it (no limit, reprovision_source)
}
FAILS_AFTER_CHECK = """
- name: A reboot playbook that passes its check run and then fails
  hosts: all
  gather_facts: false
  tasks:
    - name: Fail outside check mode
      ansible.builtin.fail:
        msg: the reboot did not work
      when: not ansible_check_mode
"""


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    with SshHost(tmp_path_factory.mktemp("sshhost")) as host:
        yield host


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, ssh_host):
    b = start_bastion(tmp_path_factory.mktemp("bastion") / "data", workers=2)
    installed = {mac: {"hostname": name, "role": "worker", "os": "fedora-43", "disk": "",
                       "ip": ssh_host.unreachable if name == "node3" else ssh_host.address,
                       "hardware": {"firmware": "bios", "dmi": {"product": "{{ lookup('pipe','id') }}"}}}
                 for name, mac in MACHINES.items()}
    state = b.data_dir.parent / "state.json"
    state.write_text(json.dumps({"installed": installed}))
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(b.data_dir), str(state)],
                   check=True, capture_output=True)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the lab-platform wheel installed from the wheelhouse only."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheelhouse = tmp / "wheelhouse"
    r = subprocess.run([sys.executable, "-m", "labctl.main", "init", "bastion", "wheelhouse", str(wheelhouse)],
                       capture_output=True, text=True, timeout=600, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    venv, env = tmp / "venv", user_env(tmp)  # not the checkout's PYTHONPATH (its egg-info is not an install)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    r = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--find-links", str(wheelhouse), "lab-platform"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def user_env(tmp: Path, bastion=None, **extra: str) -> dict[str, str]:
    """A user's shell: no checkout on PYTHONPATH, no ANSIBLE_*/LABCTL_*/LAB_* of the test run, own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "LABCTL_", "LAB_", "PYTHON"))}
    (tmp / "home").mkdir(exist_ok=True)
    # the SSH host is this machine, whose root shell puts pyenv's shims first: name the system Python
    env.update(HOME=str(tmp / "home"), LABCTL_OUTPUT="table", ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", **extra)
    if bastion:
        env.update(LABCTL_BASTION_URL=bastion.url, LABCTL_TOKEN=bastion.token)
    return env


def labctl(venv: Path, tmp: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin/labctl"), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def machine(bastion, name: str) -> dict:
    r = requests.get(f"{bastion.url}/api/machines/{MACHINES[name]}", headers=bastion.headers, timeout=10)
    r.raise_for_status()
    return r.json()


def test_the_installed_labctl_runs_every_command_it_lists(venv, tmp_path):
    env = user_env(tmp_path)
    r = labctl(venv, tmp_path, env, "--help")
    assert r.returncode == 0, r.stderr
    groups = [line.split()[0] for line in r.stdout.split("Commands:", 1)[1].splitlines() if line.strip()]
    assert {"provision", "init", "app", "doctor"} <= set(groups)
    for group in groups:  # each group's module imports and lists its commands from the wheel alone
        r = labctl(venv, tmp_path, env, group, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout, (group, r.stdout + r.stderr)
    site = next((venv / "lib").glob("python3*/site-packages"))
    shipped = site / "labctl/collection/ansible_collections/lab/platform"
    assert (shipped / "playbooks/reprovision.yml").is_file() and (shipped / "roles/bastion/tasks/main.yml").is_file()


def test_reprovision_checks_queues_and_reboots(venv, bastion, ssh_host, tmp_path):
    r = labctl(venv, tmp_path, user_env(tmp_path, bastion), "provision", "reprovision", "node1", "--role", "infra",
               "--ssh-private-key", str(ssh_host.key))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node1 (52:54:00:cc:00:01) queued for reinstall (changed: role worker -> infra)" in r.stdout
    assert "ok=" in r.stdout and "failed=0 unreachable=0" in r.stdout
    m = machine(bastion, "node1")
    assert (m["state"], m["role"]) == ("install_queued", "infra")
    queued = [e for e in m["events"] if e["kind"] == "reprovision"]
    assert queued[-1]["data"]["changed"] == {"role": ["worker", "infra"]}, queued
    assert "role worker -> infra" in queued[-1]["reason"]
    assert "--on-active=3 --unit=lab-reprovision-reboot systemctl reboot" in ssh_host.calls_made()


def test_an_unreachable_machine_is_not_queued(venv, bastion, ssh_host, tmp_path):
    r = labctl(venv, tmp_path, user_env(tmp_path, bastion), "provision", "reprovision", "node3",
               "--ssh-private-key", str(ssh_host.key))
    assert r.returncode == 14, r.stdout + r.stderr  # 10 + ansible-playbook's rc 4 (unreachable)
    assert "the check run of the reprovision playbook on node3 ended failed" in r.stderr
    assert "nothing was queued" in r.stderr
    assert machine(bastion, "node3")["state"] == "installed"


def test_a_failed_reboot_says_queued_and_how_to_cancel(venv, bastion, ssh_host, tmp_path):
    env = user_env(tmp_path, bastion)
    (tmp_path / "fails.yml").write_text(FAILS_AFTER_CHECK)
    r = labctl(venv, tmp_path, env, "provision", "reprovision", "node2", "--playbook", "fails.yml",
               "--ssh-private-key", str(ssh_host.key))
    assert r.returncode == 12, r.stdout + r.stderr  # 10 + rc 2 (a host failed)
    assert "node2 is queued for reinstall, but reprovision of node2 ended failed" in r.stderr
    assert "labctl provision cancel node2" in r.stderr
    assert machine(bastion, "node2")["state"] == "install_queued"
    r = labctl(venv, tmp_path, env, "provision", "cancel", "node2", "--reason", "reboot failed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node2 (52:54:00:cc:00:02): install_queued install cancelled" in r.stdout
    m = machine(bastion, "node2")
    assert m["state"] == "discovered" and m["events"][-1]["reason"] == "reboot failed"
    r = labctl(venv, tmp_path, env, "provision", "cancel", "node2")
    assert r.returncode == 6 and "cannot cancel a machine that is discovered" in r.stderr, r.stderr


def test_wheelhouse_from_the_installed_labctl(venv, tmp_path):
    env = user_env(tmp_path)
    r = labctl(venv, tmp_path, env, "init", "bastion", "wheelhouse", "wh", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = sorted(p.name for p in (tmp_path / "wh").glob("*.whl"))
    assert f"{len(wheels)} wheels in" in r.stdout
    ours = next(tmp_path.glob("wh/lab_platform-*.whl"))
    with zipfile.ZipFile(ours) as z:  # repacked from the installed files: the collection is in it
        names = z.namelist()
        assert "labctl/collection/ansible_collections/lab/platform/playbooks/bastion.yml" in names
        assert not [n for n in names if "__pycache__" in n or n.startswith("..")]
    # everything lab-platform needs resolves from that directory alone
    r = subprocess.run([str(venv / "bin/pip"), "install", "--dry-run", "--ignore-installed", "--disable-pip-version-check",
                        "--no-index", "--find-links", str(tmp_path / "wh"), "--report", "-", "-q", str(ours)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    resolved = {i["metadata"]["name"].lower() for i in json.loads(r.stdout)["install"]}
    assert {"lab-platform", "ansible-core", "ansible-runner", "flask"} <= resolved


# -- the collection installed by ansible-galaxy: AWX / Semaphore / ansible-playbook ----------------
@pytest.fixture(scope="module")
def installed_collection(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("galaxy")
    env = ansible_env(tmp / "none")
    r = run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp / "dist"), str(REPO)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp / "collections"
    r = run([str(BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "-p", str(dest),
             str(next((tmp / "dist").glob("lab-platform-*.tar.gz")))], env)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def playbook(coll: Path, bastion, ssh_host, *args: str) -> subprocess.CompletedProcess:
    """ansible-playbook with the shipped inventory file as AWX's project sync sees it, the bastion's
    URL and token from the environment (the credential's injectors)."""
    env = ansible_env(coll, LAB_BASTION_URL=bastion.url, LAB_BASTION_TOKEN=bastion.token,
                      ANSIBLE_PRIVATE_KEY_FILE=str(ssh_host.key), ANSIBLE_HOST_KEY_CHECKING="False")
    inv = coll / "ansible_collections/lab/platform/inventory/lab.yml"
    # the SSH host is this machine, whose root shell puts pyenv's shims first: name the system Python
    return run([str(BIN / "ansible-playbook"), "-i", str(inv), "-e", "ansible_python_interpreter=/usr/bin/python3", *args], env)


def test_awx_reprovision_queues_what_it_reboots(installed_collection, bastion, ssh_host):
    before = len(ssh_host.calls_made())
    r = playbook(installed_collection, bastion, ssh_host, "lab.platform.awx_reprovision", "-l", "node4",
                 "-e", "reprovision_os=ubuntu-26.04")
    assert r.returncode == 0, r.stdout + r.stderr
    m = machine(bastion, "node4")
    assert (m["state"], m["os"]) == ("install_queued", "ubuntu-26.04")
    assert m["events"][-1]["data"]["changed"] == {"os": ["fedora-43", "ubuntu-26.04"]}
    assert ssh_host.calls_made()[before:] == ["--on-active=3 --unit=lab-reprovision-reboot systemctl reboot"]
    # the queued machine is still a host of the shipped inventory (it has its address), so a second
    # run of the plain playbook reaches it; the queue is left as it is
    r = playbook(installed_collection, bastion, ssh_host, "lab.platform.reprovision", "-l", "node4",
                 "-e", "reprovision_reboot=false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Rebooting into their reinstall: node4" in r.stdout


def test_semaphore_reprovision_reboots_only_what_it_queued(installed_collection, bastion, ssh_host):
    """Semaphore has no limit: reprovision_source names the machines; the machines queued before
    (node1, node4 by the tests above) are not rebooted by this job."""
    queued_before = {n for n in MACHINES if machine(bastion, n)["state"] == "install_queued"}
    assert {"node1", "node4"} <= queued_before
    before = len(ssh_host.calls_made())
    r = playbook(installed_collection, bastion, ssh_host, "lab.platform.awx_reprovision", "-e", "reprovision_source=node6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Rebooting into their reinstall: node6" in r.stdout
    assert machine(bastion, "node6")["state"] == "install_queued"
    assert len(ssh_host.calls_made()) - before == 1  # one reboot: node6's


def test_no_queued_machine_is_a_failure_not_a_silent_success(installed_collection, bastion, ssh_host):
    r = playbook(installed_collection, bastion, ssh_host, "lab.platform.reprovision", "-l", "node5")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "These machines have no queued reinstall: node5" in r.stdout
    r = playbook(installed_collection, bastion, ssh_host, "lab.platform.awx_reprovision")
    assert r.returncode == 2 and "Set the job's limit" in r.stdout, r.stdout + r.stderr
    assert machine(bastion, "node5")["state"] == "installed"


def test_inventory_export_keeps_plain_values_plain(installed_collection, bastion):
    """ansible-inventory --list --export (what AWX's inventory sync reads): validated values are plain
    strings; only the machine's own strings that could be templates are marked unsafe."""
    env = ansible_env(installed_collection, LAB_BASTION_URL=bastion.url, LAB_BASTION_TOKEN=bastion.token)
    inv = installed_collection / "ansible_collections/lab/platform/inventory/lab.yml"
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list", "--export"], env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    hv = data["_meta"]["hostvars"]["node5"]
    for key in ("ansible_host", "lab_mac", "lab_ip", "lab_role", "lab_os", "lab_state", "lab_hostname", "lab_bastion"):
        assert isinstance(hv[key], str), (key, hv[key])
    assert hv["lab_firmware"] == "bios" and hv["lab_hardware"]["firmware"] == "bios"
    assert hv["lab_dmi_product"] == {"__ansible_unsafe": "{{ lookup('pipe','id') }}"}
    assert hv["lab_hardware"]["dmi"]["product"] == {"__ansible_unsafe": "{{ lookup('pipe','id') }}"}
    assert "node5" in data["lab_state_installed"]["hosts"]
