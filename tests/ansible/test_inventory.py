"""lab.platform.lab inventory plugin against a real `lab-bastion serve`: hosts, groups, host vars,
one request per source, unsafe machine strings, cache fallback, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
import yaml

from tests.support import BIN, ansible_env, inventory_list, machines_requests, run, start_bastion, unsafe

INJECT = "{{ lookup('pipe','id') }}"
INSTALLED = {
    "52:54:00:aa:00:01": {"hostname": "node1", "role": "worker", "os": "fedora-43", "ip": "10.9.0.11",
                          "hardware": {"firmware": "uefi", "memory_mb": 65536,
                                       "cpu": {"model": "EPYC", "cores": 16, "threads": 32, "arch": "x86_64"},
                                       "dmi": {"vendor": "Supermicro", "product": INJECT, "serial": "S1"},
                                       "disks": [{"name": "nvme0n1", "size_bytes": 10**12}],
                                       "nics": [{"name": "eno1", "mac": "52:54:00:aa:00:01", "link": True}]}},
    "52:54:00:aa:00:02": {"hostname": "node2", "role": "infra", "os": "ubuntu-26.04", "ip": "10.9.0.12",
                          "hardware": {"firmware": "bios", "memory_mb": 8192, "dmi": {"vendor": "Dell Inc."}}},
}
QUEUED = {"52:54:00:aa:00:03": {"hostname": "node3", "role": "worker", "os": "fedora-43"}}
DISCOVERED_MAC = "52:54:00:aa:00:04"


def seed(bastion, tmp_path):
    doc = {"installed": INSTALLED, "install_queue": QUEUED}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(bastion.data_dir),
                    str(tmp_path / "state.json")], check=True, capture_output=True)
    r = requests.post(bastion.url + "/api/discover", json={"mac": DISCOVERED_MAC, "hardware": {"dmi": {"product": INJECT}}}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def seeded(lab_bastion, tmp_path_factory):
    seed(lab_bastion, tmp_path_factory.mktemp("seed"))
    return lab_bastion


def write_source(path, **options):
    path.write_text(json.dumps({"plugin": "lab.platform.lab", **options}))
    return path


def test_installed_hosts_groups_and_vars(seeded, coll, tmp_path):
    env = ansible_env(coll, LAB_BASTION_TOKEN=seeded.token)
    inv = write_source(tmp_path / "lab.yml", sources=[seeded.url],
                       keyed_groups=[{"key": "lab_firmware", "prefix": "fw"}],
                       groups={"big": "lab_memory_mb >= 65536"}, compose={"rack": "'r-' ~ lab_dmi_vendor"})
    before = machines_requests(seeded.url)
    data = inventory_list(inv, env)
    assert machines_requests(seeded.url) - before == 1
    hv = unsafe(data["_meta"]["hostvars"])
    assert sorted(hv) == ["node1", "node2"]  # only installed machines by default
    n1 = hv["node1"]
    assert n1["ansible_host"] == "10.9.0.11"
    assert (n1["lab_mac"], n1["lab_ip"], n1["lab_role"], n1["lab_os"], n1["lab_state"]) == (
        "52:54:00:aa:00:01", "10.9.0.11", "worker", "fedora-43", "installed")
    assert (n1["lab_firmware"], n1["lab_memory_mb"], n1["lab_cpu_cores"], n1["lab_dmi_vendor"]) == ("uefi", 65536, 16, "Supermicro")
    assert n1["lab_disks"][0]["name"] == "nvme0n1" and n1["lab_nics"][0]["name"] == "eno1"
    assert n1["lab_bastion"] == seeded.url and n1["rack"] == "r-Supermicro"
    port = seeded.url.rsplit(":", 1)[1]
    assert set(data["lab_state_installed"]["hosts"]) == {"node1", "node2"}
    assert data["lab_role_worker"]["hosts"] == ["node1"] and data["lab_role_infra"]["hosts"] == ["node2"]
    assert data["lab_os_fedora_43"]["hosts"] == ["node1"] and data["lab_os_ubuntu_26_04"]["hosts"] == ["node2"]
    assert set(data[f"lab_bastion_127_0_0_1_{port}"]["hosts"]) == {"node1", "node2"}
    assert data["fw_uefi"]["hosts"] == ["node1"] and data["fw_bios"]["hosts"] == ["node2"]
    assert data["big"]["hosts"] == ["node1"]


def test_states_option_adds_the_rest_with_mac_names(seeded, coll, tmp_path):
    env = ansible_env(coll)
    inv = write_source(tmp_path / "all.lab.yml", sources=[{"url": seeded.url, "token": seeded.token, "name": "rack_a"}],
                       states=["discovered", "install_queued", "installing", "installed", "failed"])
    data = inventory_list(inv, env)
    hv = unsafe(data["_meta"]["hostvars"])
    assert sorted(hv) == ["lab-525400aa0004", "node1", "node2", "node3"]
    assert "ansible_host" not in hv["node3"] and "ansible_host" not in hv["lab-525400aa0004"]
    assert hv["lab-525400aa0004"]["lab_state"] == "discovered"
    assert data["lab_state_install_queued"]["hosts"] == ["node3"]
    assert len(data["lab_bastion_rack_a"]["hosts"]) == 4
    graph = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--graph"], env)
    assert graph.returncode == 0 and "@lab_state_discovered:" in graph.stdout and "lab-525400aa0004" in graph.stdout


def test_one_request_per_source(seeded, coll, tmp_path):
    other = start_bastion(tmp_path / "other" / "data", workers=1)
    try:
        requests.post(other.url + "/api/discover", json={"mac": "52:54:00:bb:00:01"}, timeout=10).raise_for_status()
        inv = write_source(tmp_path / "two.lab.yml", states=["installed", "discovered"],
                           sources=[{"url": seeded.url, "token": seeded.token}, {"url": other.url, "token": other.token}])
        before = (machines_requests(seeded.url), machines_requests(other.url))
        data = inventory_list(inv, ansible_env(coll))
        after = (machines_requests(seeded.url), machines_requests(other.url))
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
        assert "lab-525400bb0001" in data["_meta"]["hostvars"] and "node1" in data["_meta"]["hostvars"]
    finally:
        other.stop()


PLAYBOOK = """
- name: Show machine strings
  hosts: all
  gather_facts: false
  tasks:
    - name: Print the DMI product and a composed variable
      ansible.builtin.debug:
        msg: "PRODUCT=[{{ lab_dmi_product }}] COMPOSED=[{{ product_copy }}] HW=[{{ lab_hardware.dmi.product }}]"
"""


def test_machine_strings_are_never_templated(seeded, coll, tmp_path):
    env = ansible_env(coll, LAB_BASTION_TOKEN=seeded.token)
    inv = write_source(tmp_path / "lab.yml", sources=[seeded.url], states=["installed", "discovered"],
                       compose={"product_copy": "lab_dmi_product"})
    (tmp_path / "show.yml").write_text(PLAYBOOK)
    r = run([str(BIN / "ansible-playbook"), "-i", str(inv), str(tmp_path / "show.yml"), "--limit", "node1,lab-525400aa0004"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    uid = subprocess.run(["id"], capture_output=True, text=True).stdout.strip()
    assert uid not in out and "uid=" not in out
    literal = "PRODUCT=[{{ lookup('pipe','id') }}] COMPOSED=[{{ lookup('pipe','id') }}] HW=[{{ lookup('pipe','id') }}]"
    assert out.count(literal.replace("'", "\\'")) + out.count(literal) == 2, out


def test_cache_fallback_when_a_source_is_down(coll, tmp_path):
    b = start_bastion(tmp_path / "cached" / "data", workers=1)
    cache_dir = tmp_path / "inv-cache"
    inv = write_source(tmp_path / "cached.lab.yml", sources=[b.url], token=b.token, states=["discovered"],
                       cache=True, cache_plugin="ansible.builtin.jsonfile", cache_connection=str(cache_dir), cache_timeout=3600)
    env = ansible_env(coll)
    try:
        requests.post(b.url + "/api/discover", json={"mac": "52:54:00:cc:00:01"}, timeout=10).raise_for_status()
        first = inventory_list(inv, env)
        assert "lab-525400cc0001" in first["_meta"]["hostvars"]
        n = machines_requests(b.url)
        inventory_list(inv, env)  # a fresh cache answers without asking the bastion
        assert machines_requests(b.url) == n
    finally:
        b.stop()
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list", "--flush-cache"], env)
    assert r.returncode == 0, r.stderr
    assert "lab-525400cc0001" in json.loads(r.stdout)["_meta"]["hostvars"]
    assert "using the cached machines" in r.stderr
    # Without a cache, a source that is down is an error that names it.
    nocache = write_source(tmp_path / "nocache.lab.yml", sources=[b.url], token=b.token)
    r = run([str(BIN / "ansible-inventory"), "-i", str(nocache), "--list"], {**env, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"})
    assert r.returncode != 0 and "cannot reach " + b.url in r.stderr


def test_wrong_token_is_a_clear_error(seeded, coll, tmp_path):
    inv = write_source(tmp_path / "lab.yml", sources=[seeded.url], token="not-the-token-at-all")
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list"], {**ansible_env(coll), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"})
    assert r.returncode != 0
    assert "HTTP 401" in r.stderr and "LAB_BASTION_TOKEN" in r.stderr


def test_examples_are_inventory_files(coll):
    """EXAMPLES holds complete inventory files, `---` between them (ansible-lint reads it as YAML):
    each names the plugin and uses documented options only."""
    r = run([str(BIN / "ansible-doc"), "-t", "inventory", "--json", "lab.platform.lab"], ansible_env(coll))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["lab.platform.lab"]
    files = list(yaml.safe_load_all(doc["examples"]))
    assert len(files) == 3, doc["examples"]  # two bastion sources, one labd
    for example in files:
        assert example["plugin"] == "lab.platform.lab"
        assert set(example) <= set(doc["doc"]["options"]), sorted(set(example) - set(doc["doc"]["options"]))
