"""Issue 22: what the k3s roles render and check, compared with the values k3s, Cilium and Longhorn
name in their sources, and the playbooks' checks run against recorded kubectl/k3s outputs (no VM, no
k3s: fake hosts, tests/roles/fake_hosts.py). What only a real cluster proves is listed in docs/k3s.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.roles.fake_hosts import REPO, FakeHosts

DATA = Path(__file__).resolve().parent / "data" / "k3s"
ROLES = REPO / "roles"

# -- rendered values against their sources ---------------------------------------------------------
RENDER = """
- name: Render the roles' files and values with their defaults and vars
  hosts: all
  gather_facts: false
  vars:
    ansible_managed: rendered by tests/roles/test_k3s_sources.py
  tasks:
    - name: Load the defaults and vars of the roles
      ansible.builtin.include_vars: "{{ item }}"
      loop: "{{ files }}"
    - name: Write what was rendered
      ansible.builtin.copy:
        content: "{{ rendered | to_nice_json }}"
        dest: "{{ out }}/{{ inventory_hostname }}.json"
        mode: "0600"
      delegate_to: localhost
      vars:
        k3s_common_config: "{{ _k3s_server_config if 'k3s_servers' in group_names else _k3s_agent_config }}"
        k3s_common_kind: "{{ 'server' if 'k3s_servers' in group_names else 'agent' }}"
        k3s_common_config_summary: test
        k3s_hardening_node_type: "{{ k3s_common_kind }}"
        rendered:
          cilium: "{{ lookup('ansible.builtin.template', roles_dir + '/k3s_networking/templates/var/lib/rancher/k3s/server/manifests/cilium.yaml.j2') }}"
          config: "{{ lookup('ansible.builtin.template', roles_dir + '/k3s_common/templates/etc/rancher/k3s/config.yaml.j2') }}"
          hardening: "{{ lookup('ansible.builtin.template', roles_dir + '/k3s_hardening/templates/etc/rancher/k3s/config.yaml.d/30-lab-hardening.yaml.j2') }}"
          admission: "{{ lookup('ansible.builtin.template', roles_dir + '/k3s_hardening/templates/var/lib/rancher/k3s/server/lab-admission.yaml.j2') }}"
          selinux_repo: "{{ _k3s_host_prep_selinux_repo | default({}) }}"
          images_dir: "{{ _k3s_common_images_dir }}"
          server_version: "{{ k3s_server_version }}"
          agent_version: "{{ k3s_agent_version }}"
"""
ROLE_FILES = [f"{ROLES}/{p}" for p in (
    "k3s_common/defaults/main.yml", "k3s_common/vars/main.yml", "k3s_networking/defaults/main.yml",
    "k3s_networking/vars/main.yml", "k3s_hardening/defaults/main.yml", "k3s_hardening/vars/main.yml",
    "k3s_server/defaults/main.yml", "k3s_server/vars/main.yml", "k3s_agent/defaults/main.yml",
    "k3s_agent/vars/main.yml", "k3s_host_prep/defaults/main.yml")]


def _server(nodename, address, **more):
    return {"ansible_nodename": nodename, "ansible_default_ipv4": {"address": address}, **more}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Two servers and an agent (HA shape), one of them with a capitalised host name, plus Red Hat
    hosts for the k3s-selinux repository (install.sh's distribution table)."""
    tmp = tmp_path_factory.mktemp("render")
    rhel = {"ansible_os_family": "RedHat", **_server("el.lab.example", "192.0.2.31")}
    hosts = FakeHosts(tmp / "hosts", {
        "k3s_servers": {"s1": _server("Server-1.Lab.Example", "192.0.2.11"),
                        "s2": _server("server-2.lab.example", "192.0.2.12")},
        "k3s_agents": {"w1": _server("Worker-1.Lab.Example", "192.0.2.21")},
        "rhel9": {"rocky9": {**rhel, "ansible_distribution": "Rocky", "ansible_distribution_major_version": "9"}},
        "rhel8": {"alma8": {**rhel, "ansible_distribution": "AlmaLinux", "ansible_distribution_major_version": "8"}},
        "fedora": {"fedora41": {**rhel, "ansible_distribution": "Fedora", "ansible_distribution_major_version": "41"}},
    })
    book = tmp / "render.yml"
    book.write_text(RENDER)
    out = tmp / "out"
    out.mkdir()
    files = {h: ROLE_FILES + ([f"{ROLES}/k3s_host_prep/vars/RedHat.yml"] if h in ("rocky9", "alma8", "fedora41") else [])
             for h in ("s1", "s2", "w1", "rocky9", "alma8", "fedora41")}
    result = {}
    for host, host_files in files.items():
        r = hosts.play(book, {"files": host_files, "out": str(out), "roles_dir": str(ROLES)}, limit=host)
        assert r.rc == 0, (r.failed_messages(), r.stderr[-2000:])
        result[host] = json.loads((out / f"{host}.json").read_text())
    return result


def _values(doc):
    return yaml.safe_load(yaml.safe_load(doc["cilium"])["spec"]["valuesContent"])


def _merged(doc):
    merged = yaml.safe_load(doc["config"])
    for key, value in (yaml.safe_load(doc["hardening"]) or {}).items():
        merged[key.rstrip("+")] = (merged.get(key.rstrip("+")) or []) + value if key.endswith("+") else value
    return merged


# item, what is compared, expected (the source's value), source
SOURCES = [
    ("1", lambda r: _values(r["s1"])["cni"]["binPath"], "/var/lib/rancher/k3s/data/cni",
     "k3s-io/k3s PR #10868 / issue #10869 (backport #10928): containerd bin_dir = /var/lib/rancher/k3s/data/cni"),
    ("1", lambda r: _values(r["s1"])["cni"]["confPath"], "/var/lib/rancher/k3s/agent/etc/cni/net.d",
     "k3s-io/k3s #11799 validation: containerd conf_dir = /var/lib/rancher/k3s/agent/etc/cni/net.d"),
    ("2", lambda r: r["w1"]["images_dir"], "/var/lib/rancher/k3s/agent/images",
     "docs.k3s.io installation/airgap: images archives in /var/lib/rancher/k3s/agent/images"),
    ("3", lambda r: r["rocky9"]["selinux_repo"]["baseurl"], "https://rpm.rancher.io/k3s/stable/common/centos/9/noarch",
     "k3s-io/k3s install.sh setup_selinux/install_selinux_rpm: el9 -> centos/9"),
    ("3", lambda r: r["alma8"]["selinux_repo"]["baseurl"], "https://rpm.rancher.io/k3s/stable/common/centos/8/noarch",
     "k3s-io/k3s install.sh setup_selinux: VERSION_ID 8 -> centos/8"),
    ("3", lambda r: r["fedora41"]["selinux_repo"]["baseurl"], "https://rpm.rancher.io/k3s/stable/common/centos/8/noarch",
     "k3s-io/k3s install.sh setup_selinux: VERSION_ID > 36 (Fedora) -> centos/8"),
    ("3", lambda r: (r["rocky9"]["selinux_repo"]["name"], r["rocky9"]["selinux_repo"]["file"],
                     r["rocky9"]["selinux_repo"]["gpgkey"]),
     ("rancher-k3s-common-stable", "rancher-k3s-common", "https://rpm.rancher.io/public.key"),
     "k3s-io/k3s install.sh install_selinux_rpm: [rancher-k3s-common-${channel}] in rancher-k3s-common.repo, gpgkey"),
    ("4", lambda r: {_values(r["s1"])["k8sServiceHost"], _values(r["s2"])["k8sServiceHost"]}, {"192.0.2.11"},
     "k3s-io/k3s pkg/deploy/controller.go: every server applies its own manifests dir; Cilium k3s guide: one API host"),
    ("4", lambda r: r["s1"]["cilium"] == r["s2"]["cilium"], True,
     "k3s-io/k3s pkg/deploy/controller.go: a manifest that differs per server is re-applied at each server's start"),
    ("5", lambda r: (yaml.safe_load(r["s1"]["config"])["node-name"], yaml.safe_load(r["w1"]["config"])["node-name"]),
     ("server-1.lab.example", "worker-1.lab.example"),
     "k3s-io/k3s pkg/cli/cmds/agent.go --node-name; k3s names an unnamed node after the lowercased host name"),
    ("9", lambda r: (r["s1"]["server_version"], r["w1"]["agent_version"]), ("v1.31.5+k3s1", "v1.31.5+k3s1"),
     "k3s-io/k3s PR #11485: `k3s certificate check --output table` (v1.31.5+k3s1, docs.k3s.io release-notes v1.31.X)"),
    ("10", lambda r: yaml.safe_load(r["s1"]["admission"])["plugins"][0]["configuration"]["exemptions"]["namespaces"],
     ["kube-system", "longhorn-system"],
     "Longhorn docs (Pod Security: longhorn-system runs privileged pods); k3s hardening guide PSA exemptions"),
    ("10", lambda r: "terminated-pod-gc-threshold=100" in _merged(r["s1"])["kube-controller-manager-arg"], True,
     "k3s-io/docs docs/security/hardening-guide.md (PR #497): terminated-pod-gc-threshold=100"),
    ("10", lambda r: "service-account-extend-token-expiration=false" in _merged(r["s1"])["kube-apiserver-arg"], True,
     "k3s-io/docs docs/security/hardening-guide.md: service-account-extend-token-expiration=false"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("item,value,expected,source", SOURCES, ids=[f"item{s[0]}-{i}" for i, s in enumerate(SOURCES)])
def test_rendered_value_matches_source(rendered, item, value, expected, source):
    assert value(rendered) == expected, f"issue 22 item {item}: not what {source} says"


# -- item 1: containerd's CNI paths checked after the first start -------------------------------------
@pytest.mark.parametrize("toml,ok", [("containerd-config-v1.31.5.toml", True), ("containerd-config-hashed-bindir.toml", False)])
def test_containerd_cni_paths_checked_against_cilium(tmp_path, toml, ok):
    hosts = FakeHosts(tmp_path, {"k3s_servers": {"s1": {}}})
    book = tmp_path / "verify.yml"
    book.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.include_role: {name: lab.platform.k3s_networking, tasks_from: verify}\n")
    r = hosts.play(book, {"_k3s_common_containerd_config": str(DATA / toml)})
    assert (r.rc == 0) == ok, r.failed_messages()
    if not ok:
        msg = r.failed_messages()["s1"]
        assert "data/3e5d7a5a" in msg and "cni.binPath /var/lib/rancher/k3s/data/cni" in msg


# -- preflights: item 2 (Cilium images air-gapped) and item 6 (default route) --------------------------
def test_airgap_without_cilium_images_fails_in_preflight(tmp_path):
    hosts = FakeHosts(tmp_path / "h", {"k3s_servers": {"s1": _server("s1", "192.0.2.11")}})
    chart = tmp_path / "cilium-1.16.5.tgz"
    chart.write_bytes(b"")
    book = tmp_path / "pre.yml"
    book.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.include_role: {name: lab.platform.k3s_networking, tasks_from: preflight}\n")
    r = hosts.play(book, {"k3s_networking_cilium_chart_archive": str(chart)})
    assert r.rc != 0
    assert "Air-gapped install without Cilium's images" in r.failed_messages()["s1"]
    images = tmp_path / "cilium-images.tar.zst"
    images.write_bytes(b"")
    r = hosts.play(book, {"k3s_networking_cilium_chart_archive": str(chart), "k3s_networking_cilium_images": [str(images)]})
    assert r.rc == 0, r.failed_messages()


@pytest.mark.parametrize("route,ok", [("", False), ("default via 192.0.2.1 dev eth0 proto static\n", True)])
def test_default_route_preflight(tmp_path, route, ok):
    hosts = FakeHosts(tmp_path, {"k3s_servers": {"s1": _server("s1", "192.0.2.11")},
                                 "k3s_agents": {"w1": _server("w1", "192.0.2.21", k3s_agent_token="t" * 64)}})
    hosts.respond("ip -4 route show default", stdout=route)
    hosts.respond("ip -6 route show default", stdout="")
    book = tmp_path / "pre.yml"
    book.write_text("- hosts: k3s_agents\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.include_role: {name: lab.platform.k3s_agent, tasks_from: preflight}\n")
    r = hosts.play(book, {"k3s_agent_install_method": "download"})
    assert (r.rc == 0) == ok, (r.failed_messages(), r.stderr[-2000:])
    assert ["ip", "-4", "route", "show", "default"] in r.argvs("w1")
    if not ok:
        msg = r.failed_messages()["w1"]
        assert "has no default route" in msg and "ip route add default via 203.0.113.255 dev dummy0" in msg


# -- item 8: the restart handler, one host at a time --------------------------------------------------
RESTART = """
- name: Notify the restart handler on three servers
  hosts: k3s_servers
  gather_facts: false
  roles:
    - role: lab.platform.k3s_common
      vars:
        k3s_common_caller: test
  tasks:
    - name: Say what the configure entry point says about the node
      ansible.builtin.set_fact:
        __k3s_common_node: {name: "node-{{ inventory_hostname }}", kubectl_host: "{{ inventory_hostname }}", ready_timeout: 10}
    - name: Change the configuration
      ansible.builtin.command: /bin/true
      changed_when: true
      notify: lab.platform k3s configuration changed
"""


def test_restart_handler_restarts_one_server_at_a_time_with_a_ready_wait(tmp_path):
    hosts = FakeHosts(tmp_path, {"k3s_servers": {h: _server(h, f"192.0.2.1{i}") for i, h in enumerate(("s1", "s2", "s3"))}})
    hosts.respond("systemctl is-active k3s k3s-agent", stdout="active\ninactive\n", rc=3)
    hosts.respond("systemctl show k3s", stdout="Id=k3s.service\nLoadState=loaded\nActiveState=active\nSubState=running\n")
    hosts.respond(["k3s", "kubectl", "get", "node"], stdout="True")
    book = tmp_path / "restart.yml"
    book.write_text(RESTART)
    r = hosts.play(book)
    assert r.rc == 0, (r.failed_messages(), r.stderr[-2000:])
    steps = [(c["host"], c["argv"][1] if c["argv"][0] == "systemctl" else "ready:" + c["argv"][4])
             for c in r.calls if c["argv"][:2] in (["systemctl", "restart"], ["k3s", "kubectl"])]
    assert steps == [("s1", "restart"), ("s1", "ready:node-s1"), ("s2", "restart"), ("s2", "ready:node-s2"),
                     ("s3", "restart"), ("s3", "ready:node-s3")], steps


# -- item 7: the reset play's order --------------------------------------------------------------------
def test_reset_removes_cilium_state_before_stopping_k3s_then_does_what_killall_does(tmp_path):
    hosts = FakeHosts(tmp_path / "h", {"k3s_agents": {"w1": {}}})
    for link in ("cilium_host", "cilium_net", "cilium_vxlan", "cni0"):
        hosts.respond(["ip", "link", "show", link], rc=0)
    for link in ("cilium_geneve", "flannel.1", "flannel-v6.1", "kube-ipvs0", "flannel-wg", "flannel-wg-v6"):
        hosts.respond(["ip", "link", "show", link], rc=1)
    rules = ("*filter\n:CILIUM_INPUT - [0:0]\n-A INPUT -m comment --comment \"cilium-feeder: CILIUM_INPUT\" -j CILIUM_INPUT\n"
             "-A INPUT -j KUBE-FIREWALL\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    hosts.respond("iptables-save", stdout=rules)
    hosts.respond("ip6tables-save", stdout="*filter\nCOMMIT\n")
    hosts.respond("systemctl show", stdout="Id=k3s.service\nLoadState=loaded\nActiveState=active\nSubState=running\n")
    hosts.respond("ps", stdout="")
    hosts.respond("umount", rc=1)
    removed = tmp_path / "removed"
    removed.mkdir()
    (removed / "k3s").write_text("x")
    r = hosts.play(REPO / "playbooks/k3s_reset.yml", {"k3s_reset_confirm": True,
                                                      "k3s_reset_removed_paths": [str(removed / "k3s")]})
    assert r.rc == 0, (r.failed_messages(), r.stderr[-2000:])
    assert r.task_names("w1") == [
        "Refuse to run without confirmation", "Remove Cilium's links and iptables rules",
        "Stop and disable the k3s services", "Kill the containerd shims k3s left running, with their processes",
        "Unmount and remove the pod volumes and network namespaces",
        "Remove the CNI namespaces, interfaces and the k3s iptables rules",
        "Remove k3s, its configuration and its cluster state", "Reload systemd units"]
    argvs = r.argvs("w1")
    first_stop = next(i for i, a in enumerate(argvs) if a[:2] == ["systemctl", "stop"])
    cilium = [i for i, a in enumerate(argvs) if a[:3] == ["ip", "link", "delete"] and a[3].startswith("cilium_")]
    assert [argvs[i][3] for i in cilium] == ["cilium_host", "cilium_net", "cilium_vxlan"]
    assert max(cilium) < first_stop
    restores = [c for c in r.calls if c["argv"][0] == "iptables-restore"]
    assert "cilium" not in restores[0]["stdin"].lower() and "--dport 22" in restores[0]["stdin"]
    assert r.calls.index(restores[0]) < first_stop
    assert ["ip", "link", "delete", "cni0"] in argvs[first_stop:]  # k3s-killall.sh's remove_interfaces
    assert not (removed / "k3s").exists()


# -- item 9: the health play on recorded outputs --------------------------------------------------------
def _health(tmp_path, nodes, pods, version="v1.31.5+k3s1"):
    hosts = FakeHosts(tmp_path, {"k3s_servers": {"s1": {}}, "k3s_agents": {"w1": {}}})
    hosts.respond("systemctl is-active", stdout="active\n")
    hosts.respond("k3s kubectl get --raw /readyz", stdout="ok")
    hosts.respond("k3s --version", stdout=f"k3s version {version} (56ec5dd4)\ngo version go1.22.10\n")
    hosts.respond("k3s certificate check", stdout="INFO[0000] Server detected, checking agent and server certificates\n")
    hosts.respond("k3s certificate check --output", rc=1, stdout="Incorrect Usage: flag provided but not defined: -output\n")
    if version >= "v1.31.5":
        hosts.respond("k3s certificate check --output table",
                      stdout="CERTIFICATE  SUBJECT  STATUS  EXPIRES\nclient-admin.crt  CN=system:admin,O=system:masters  OK  2026-01-28T10:00:00Z\n")
    hosts.respond("k3s secrets-encrypt status", stdout="Encryption Status: Enabled\nCurrent Rotation Stage: start\n"
                  "Server Encryption Hashes: All hashes match\n\nActive  Key Type  Name\n------  --------  ----\n *      AES-CBC   aescbckey\n")
    hosts.respond("k3s kubectl get nodes -o json", stdout=(DATA / nodes).read_text())
    hosts.respond("k3s kubectl get pods --all-namespaces -o json", stdout=(DATA / pods).read_text())
    hosts.respond("k3s kubectl -n kube-system exec ds/cilium", stdout="OK\n")
    return hosts.play(REPO / "playbooks/k3s_health.yml")


def test_health_passes_on_a_ready_cluster(tmp_path):
    r = _health(tmp_path, "nodes-ready.json", "pods-running.json")
    assert r.rc == 0, (r.failed_messages(), r.stderr[-2000:])
    assert ["k3s", "certificate", "check", "--output", "table"] in r.argvs("s1")


def test_health_fails_on_a_not_ready_node(tmp_path):
    r = _health(tmp_path, "nodes-notready.json", "pods-running.json")
    assert r.failed_messages() == {"s1": "Nodes not Ready: worker-1.lab.example (kubectl describe node NAME)"}


@pytest.mark.parametrize("pods,bad", [("pods-crashloop.json", "longhorn-system/longhorn-manager-x7k2p"),
                                      ("pods-pending.json", "default/web-0")])
def test_health_fails_on_crash_looping_and_pending_pods(tmp_path, pods, bad):
    r = _health(tmp_path, "nodes-ready.json", pods)
    msg = r.failed_messages()["s1"]
    assert msg.startswith("Pods not Running/Succeeded or with a container in CrashLoopBackOff/")
    assert msg.split(": ", 1)[1].startswith(bad + " ("), msg


def test_health_certificate_check_without_output_before_v1_31_5(tmp_path):
    r = _health(tmp_path, "nodes-ready.json", "pods-running.json", version="v1.31.4+k3s1")
    assert r.rc == 0, (r.failed_messages(), r.stderr[-2000:])
    assert ["k3s", "certificate", "check"] in r.argvs("s1")
    assert not any(a[:4] == ["k3s", "certificate", "check", "--output"] for a in r.argvs("s1"))
