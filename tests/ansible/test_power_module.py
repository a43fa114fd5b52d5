"""lab.platform.lab_power and playbooks/reprovision_power.yml through real ansible-playbook runs
against a real `lab-bastion serve` and sushy-tools' Redfish emulator (tests/bmc.py)."""

from __future__ import annotations

import pytest
import requests

from tests.support import BIN, HW, INSTALL, Machines, ansible_env, recap, run, start_redfish_bmc

USER, PASSWORD = "ansible-op", "Ans1ble-BMC-pw"
SYSTEMS = [{"uuid": f"00000000-0000-0000-0000-0000000001{i:02x}", "name": f"ans{i}", "power_state": "Off", "nics": []}
           for i in range(2)]
MACS = ["52:54:00:dd:10:01", "52:54:00:dd:10:02"]


@pytest.fixture(scope="module")
def redfish(tmp_path_factory):
    b = start_redfish_bmc(tmp_path_factory.mktemp("redfish"), SYSTEMS, USER, PASSWORD)
    yield b
    b.stop()


def play(tmp_path, coll, bastion, tasks: str, *args: str):
    (tmp_path / "play.yml").write_text(
        "- name: Drive the BMC\n  hosts: localhost\n  gather_facts: false\n"
        "  module_defaults:\n    group/lab.platform.lab:\n      url: \"{{ lookup('ansible.builtin.env', 'LAB_BASTION_URL') }}\"\n"
        "  tasks:\n" + tasks)
    env = ansible_env(coll, LAB_BASTION_URL=bastion.url, LAB_BASTION_TOKEN=bastion.token)
    r = run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(tmp_path / "play.yml"), *args], env)
    return r, recap(r.stdout).get("localhost", {})


def power_events(bastion, mac):
    doc = requests.get(f"{bastion.url}/api/machines/{mac}", headers=bastion.headers, timeout=10).json()
    return [e for e in doc["events"] if e["kind"] == "power" and e["data"].get("action") != "status"]


TASK = """
    - name: Power on through the BMC
      lab.platform.lab_power:
        mac: "{mac}"
        state: "on"
        bmc:
          driver: redfish
          address: "{address}"
          username: {user}
          password: "{password}"
          system_id: "{system}"
      register: powered
"""


def test_lab_power_check_mode_then_real_then_idempotent(lab_bastion, coll, redfish, tmp_path):
    b = lab_bastion
    requests.post(b.url + "/api/discover", json={"mac": MACS[0], "hardware": HW}, timeout=10).raise_for_status()
    tasks = TASK.format(mac=MACS[0], address=redfish.address, user=USER, password=PASSWORD, system=SYSTEMS[0]["uuid"])
    r, stats = play(tmp_path, coll, b, tasks, "--check")
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout + r.stderr
    assert requests.get(f"{b.url}/api/machines/{MACS[0]}/bmc", headers=b.headers, timeout=10).status_code == 404
    r, stats = play(tmp_path, coll, b, tasks)
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout + r.stderr
    assert len(power_events(b, MACS[0])) == 1
    r, stats = play(tmp_path, coll, b, tasks)
    assert r.returncode == 0 and stats["changed"] == 0, r.stdout + r.stderr
    assert len(power_events(b, MACS[0])) == 1  # state=on on a machine that is on: no power call
    assert PASSWORD not in r.stdout + r.stderr


def test_reprovision_power_playbook(lab_bastion, coll, redfish, tmp_path):
    b = lab_bastion
    ms = Machines(b)
    ms.discover(MACS[1])
    requests.post(b.url + "/api/install", json={**INSTALL, "mac": MACS[1], "hostname": "ans-pw"}, headers=b.headers,
                  timeout=10).raise_for_status()
    ms.progress(MACS[1], ms.boot(MACS[1]), "complete", 100)
    requests.put(f"{b.url}/api/machines/{MACS[1]}/bmc", headers=b.headers, timeout=10, json={
        "driver": "redfish", "address": redfish.address, "username": USER, "password": PASSWORD,
        "system_id": SYSTEMS[1]["uuid"]}).raise_for_status()
    inv = tmp_path / "inv.yml"
    # what the lab.platform.lab inventory gives an installed machine
    inv.write_text(f"lab_state_installed:\n  hosts:\n    ans-pw:\n      lab_mac: \"{MACS[1]}\"\n      lab_bastion_url: {b.url}\n")
    env = ansible_env(coll, LAB_BASTION_TOKEN=b.token)
    r = run([str(BIN / "ansible-playbook"), "-i", str(inv), "lab.platform.reprovision_power", "-l", "ans-pw"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ans-pw: power off -> on" in r.stdout
    m = requests.get(f"{b.url}/api/machines/{MACS[1]}", headers=b.headers, timeout=10).json()
    assert m["state"] == "install_queued"
    last = power_events(b, MACS[1])[-1]["data"]
    assert (last["action"], last["boot"], last["power"]) == ("cycle", "network", "on")
    # without a limit the playbook refuses to run
    r = run([str(BIN / "ansible-playbook"), "-i", str(inv), "lab.platform.reprovision_power"], env)
    assert r.returncode != 0 and "Limit the run" in r.stdout
