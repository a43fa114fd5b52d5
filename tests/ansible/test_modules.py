"""lab.platform modules through real ansible-playbook runs against a real `lab-bastion serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from tests.support import BIN, REPO, ansible_env, recap, run

MAC = "52:54:00:dd:00:01"


def playbook(tmp_path, coll, bastion, tasks: str, *args: str, name="play.yml"):
    (tmp_path / name).write_text(
        "- name: Drive the bastion\n  hosts: localhost\n  gather_facts: false\n"
        "  module_defaults:\n    group/lab.platform.lab:\n      url: \"{{ lookup('ansible.builtin.env', 'LAB_BASTION_URL') }}\"\n"
        "  tasks:\n" + tasks
    )
    env = ansible_env(coll, LAB_BASTION_URL=bastion.url, LAB_BASTION_TOKEN=bastion.token)
    r = run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(tmp_path / name), *args], env)
    return r, recap(r.stdout).get("localhost", {})


def machine(bastion, mac=MAC):
    r = requests.get(f"{bastion.url}/api/machines/{mac}", headers=bastion.headers, timeout=10)
    return r.json() if r.status_code == 200 else None


INSTALL = """
    - name: Queue the install
      lab.platform.lab_machine:
        mac: "52-54-00-DD-00-01"
        hostname: node9
        role: worker
        os: fedora-43
        ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZm test@lab"]
      register: queued
    - name: Check the answer
      ansible.builtin.assert:
        that:
          - queued.machine.state == 'install_queued'
          - queued.machine.hostname == 'node9'
"""


@pytest.fixture(scope="module")
def discovered(lab_bastion):
    requests.post(lab_bastion.url + "/api/discover", json={"mac": MAC, "hardware": {"firmware": "uefi"}}, timeout=10).raise_for_status()
    return lab_bastion


def test_install_check_mode_then_real_then_idempotent(discovered, coll, tmp_path):
    b = discovered
    r, stats = playbook(tmp_path, coll, b, INSTALL.split("    - name: Check the answer")[0], "--check", "--diff")
    assert r.returncode == 0, r.stdout + r.stderr
    assert stats["changed"] == 1 and machine(b)["state"] == "discovered"  # check mode changed nothing
    assert '+    "hostname": "node9"' in r.stdout or '"hostname": "node9"' in r.stdout  # the diff shows the new value
    r, stats = playbook(tmp_path, coll, b, INSTALL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stats["changed"] == 1
    m = machine(b)
    assert (m["state"], m["hostname"], m["role"], m["os"]) == ("install_queued", "node9", "worker", "fedora-43")
    events = len(m["events"])
    r, stats = playbook(tmp_path, coll, b, INSTALL)
    assert r.returncode == 0 and stats["changed"] == 0, r.stdout
    assert len(machine(b)["events"]) == events  # the second run did not touch the bastion


def test_changed_parameters_requeue_and_installed_needs_reprovision(discovered, coll, tmp_path):
    b = discovered
    r, stats = playbook(tmp_path, coll, b, INSTALL.replace("role: worker", "role: infra"))
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout
    assert machine(b)["role"] == "infra"
    # An installed machine with other parameters: refused unless reprovision=true.
    mac = "52:54:00:dd:00:03"
    (tmp_path / "state.json").write_text(json.dumps({"installed": {mac: {"hostname": "node8", "role": "worker", "os": "fedora-43"}}}))
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(b.data_dir), str(tmp_path / "state.json")],
                   check=True, capture_output=True)
    task = "    - name: Reinstall as ubuntu\n      lab.platform.lab_machine:\n        mac: " + mac + \
        "\n        hostname: node8\n        role: worker\n        os: ubuntu-26.04\n"
    r, _ = playbook(tmp_path, coll, b, task)
    assert r.returncode != 0 and "set reprovision=true" in r.stdout and machine(b, mac)["state"] == "installed"
    same = task.replace("ubuntu-26.04", "fedora-43")
    r, stats = playbook(tmp_path, coll, b, same)
    assert r.returncode == 0 and stats["changed"] == 0  # installed as asked: nothing to do
    r, stats = playbook(tmp_path, coll, b, task + "        reprovision: true\n")
    assert r.returncode == 0 and stats["changed"] == 1
    assert (machine(b, mac)["state"], machine(b, mac)["os"]) == ("install_queued", "ubuntu-26.04")


def test_debug_and_absent(discovered, coll, tmp_path):
    b = discovered
    tasks = """
    - name: Ask for a rescue boot
      lab.platform.lab_machine:
        mac: "52:54:00:dd:00:01"
        state: debug
        debug_mode: pxe
"""
    r, stats = playbook(tmp_path, coll, b, tasks)
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout
    assert machine(b)["debug"] == "pxe"
    r, stats = playbook(tmp_path, coll, b, tasks)
    assert r.returncode == 0 and stats["changed"] == 0, r.stdout
    info = """
    - name: Read it
      lab.platform.lab_machine_info:
        mac: "52:54:00:dd:00:01"
      register: one
    - name: Read all installing ones
      lab.platform.lab_machine_info:
        machine_state: install_queued
      register: queued
    - name: Check
      ansible.builtin.assert:
        that:
          - one.machines | length == 1
          - one.machines[0].events | length > 0
          - queued.machines | rejectattr('state', 'eq', 'install_queued') | list == []
          - queued.machines | map(attribute='mac') | sort == EXPECTED
          - one is not changed
"""
    expected = sorted(m["mac"] for m in requests.get(b.url + "/api/machines", headers=b.headers, timeout=10).json()["machines"]
                      if m["state"] == "install_queued")
    r, stats = playbook(tmp_path, coll, b, info.replace("EXPECTED", json.dumps(expected)), name="info.yml")
    assert r.returncode == 0, r.stdout
    absent = tasks.replace("state: debug", "state: absent").replace("        debug_mode: pxe\n", "")
    r, stats = playbook(tmp_path, coll, b, absent, "--check")
    assert r.returncode == 0 and stats["changed"] == 1 and machine(b) is not None
    r, stats = playbook(tmp_path, coll, b, absent)
    assert r.returncode == 0 and stats["changed"] == 1 and machine(b) is None
    r, stats = playbook(tmp_path, coll, b, absent)
    assert r.returncode == 0 and stats["changed"] == 0


def test_bad_input_fails_clearly_and_changes_nothing(lab_bastion, coll, tmp_path):
    b = lab_bastion
    mac = "52:54:00:dd:00:02"
    requests.post(b.url + "/api/discover", json={"mac": mac}, timeout=10).raise_for_status()
    bad = INSTALL.replace("52-54-00-DD-00-01", mac).replace("node9", "bad_host\\nname")
    r, stats = playbook(tmp_path, coll, b, bad)
    assert r.returncode != 0 and "HTTP 422" in r.stdout, r.stdout
    assert machine(b, mac)["state"] == "discovered"
    unknown = INSTALL.replace("52-54-00-DD-00-01", "52:54:00:dd:00:99")
    r, _ = playbook(tmp_path, coll, b, unknown)
    assert r.returncode != 0 and "must PXE-boot once to be discovered" in r.stdout


def test_wrong_token(lab_bastion, coll, tmp_path):
    (tmp_path / "p.yml").write_text(
        "- name: Read\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: Read machines\n      lab.platform.lab_machine_info:\n        url: " + lab_bastion.url + "\n        token: wrong-token-value\n")
    r = run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(tmp_path / "p.yml")], ansible_env(coll))
    assert r.returncode != 0 and "HTTP 401" in r.stdout and "wrong-token-value" not in r.stdout


@pytest.mark.skipif(os.path.isdir("/sys/firmware/efi"), reason="this host is UEFI: efi_bootnext would really set BootNext")
def test_efi_bootnext_changes_nothing_on_bios(coll):
    r = run([str(BIN / "ansible"), "localhost", "-c", "local", "-m", "lab.platform.efi_bootnext", "-o"], ansible_env(coll))
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"changed": false' in r.stdout and '"firmware": "bios"' in r.stdout


def test_lab_client_is_ansible_core_only():
    """plugins/ must run in an execution environment with ansible-core alone."""
    for path in (REPO / "plugins").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("labcore", "bastion_app", "flask", "requests", "pydantic"):
            assert f"import {forbidden}" not in text and f"from {forbidden}" not in text, (path, forbidden)


def test_reprovisioned_and_cancelled(lab_bastion, coll, tmp_path):
    """state=reprovisioned queues the reinstall of an installed machine (with another role/OS, saying
    what changed, and the event records it); state=cancelled withdraws it; both are idempotent."""
    b, mac = lab_bastion, "52:54:00:dd:00:05"
    (tmp_path / "state.json").write_text(json.dumps({"installed": {mac: {"hostname": "node7", "role": "worker", "os": "fedora-43"}}}))
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(b.data_dir), str(tmp_path / "state.json")],
                   check=True, capture_output=True)
    task = "    - name: Change it\n      lab.platform.lab_machine:\n        mac: " + mac + "\n        state: {state}\n{extra}" \
        "      register: out\n    - name: Show what changed\n      ansible.builtin.debug:\n        msg: \"CHANGES={{{{ out.changes | to_json }}}}\"\n"
    r, stats = playbook(tmp_path, coll, b, task.format(state="reprovisioned", extra="        role: infra\n"))
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout
    assert 'CHANGES={\\"role\\": [\\"worker\\", \\"infra\\"]}' in r.stdout or 'CHANGES={"role": ["worker", "infra"]}' in r.stdout, r.stdout
    m = machine(b, mac)
    assert (m["state"], m["role"]) == ("install_queued", "infra")
    assert m["events"][-1]["kind"] == "reprovision" and m["events"][-1]["data"]["changed"] == {"role": ["worker", "infra"]}
    r, stats = playbook(tmp_path, coll, b, task.format(state="reprovisioned", extra=""))
    assert r.returncode == 0 and stats["changed"] == 0, r.stdout  # already queued
    r, stats = playbook(tmp_path, coll, b, task.format(state="reprovisioned", extra="        os: ubuntu-26.04\n"))
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout  # re-queued with another OS
    m = machine(b, mac)
    assert (m["state"], m["role"], m["os"], m["hostname"]) == ("install_queued", "infra", "ubuntu-26.04", "node7")
    assert m["events"][-1]["data"]["changed"] == {"os": ["fedora-43", "ubuntu-26.04"]}
    assert m["events"][-1]["reason"] == "install queued; os fedora-43 -> ubuntu-26.04"
    r, stats = playbook(tmp_path, coll, b, task.format(state="cancelled", extra=""), "--check")
    assert r.returncode == 0 and stats["changed"] == 1 and machine(b, mac)["state"] == "install_queued"
    r, stats = playbook(tmp_path, coll, b, task.format(state="cancelled", extra=""))
    assert r.returncode == 0 and stats["changed"] == 1 and machine(b, mac)["state"] == "discovered"
    r, stats = playbook(tmp_path, coll, b, task.format(state="cancelled", extra=""))
    assert r.returncode == 0 and stats["changed"] == 0
    r, _ = playbook(tmp_path, coll, b, task.format(state="reprovisioned", extra=""))
    assert r.returncode != 0 and "is discovered, not installed; queue an install with state=queued" in r.stdout
