"""Verify the k3s chain on the live VMs as an operator would (testinfra, run by `molecule verify`).

The VMs got playbooks/k3s.yml up to the line: a stand-in k3s binary was installed and everything
was configured, but k3s was not started (no real binary can be downloaded here).
"""

import yaml
from k3s_docs import (
    AGENT_FLAGS,
    CILIUM_VALUES,
    HELMCHART_SPEC_FIELDS,
    KUBE_APISERVER_FLAGS,
    KUBE_CONTROLLER_MANAGER_FLAGS,
    KUBELET_FLAGS,
    SERVER_FLAGS,
)

SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.bridge.bridge-nf-call-iptables": 1,
    "net.bridge.bridge-nf-call-ip6tables": 1,
    "fs.inotify.max_user_instances": 8192,
    "fs.inotify.max_user_watches": 524288,
    "vm.panic_on_oom": 0,
    "vm.overcommit_memory": 1,
    "kernel.panic": 10,
    "kernel.panic_on_oops": 1,
}


def groups(host):
    return set(host.ansible.get_variables().get("group_names", []))


def is_server(host):
    return "k3s_servers" in groups(host)


def read_yaml(host, path):
    f = host.file(path)
    assert f.exists, f"{path} missing"
    return yaml.safe_load(f.content_string)


def merged_config(host):
    """config.yaml then config.yaml.d/*.yaml in order, as k3s reads them ("+" appends)."""
    files = ["/etc/rancher/k3s/config.yaml"] + sorted(
        f"/etc/rancher/k3s/config.yaml.d/{name}"
        for name in host.file("/etc/rancher/k3s/config.yaml.d").listdir()
        if name.endswith(".yaml")
    )
    merged, raw_keys = {}, set()
    for path in files:
        for key, value in (read_yaml(host, path) or {}).items():
            raw_keys.add(key)
            if key.endswith("+"):
                key = key[:-1]
                base = merged.get(key, [])
                merged[key] = (base if isinstance(base, list) else [base]) + (value if isinstance(value, list) else [value])
            else:
                merged[key] = value
    return merged, raw_keys


def arg_names(args):
    return {a.split("=", 1)[0] for a in args}


# -- k3s_host_prep -----------------------------------------------------------------------------
def test_kernel_modules_loaded_and_persistent(host):
    conf = host.file("/etc/modules-load.d/k3s.conf")
    assert conf.mode == 0o644
    for module in ("br_netfilter", "overlay"):
        assert host.file(f"/sys/module/{module}").is_directory, f"{module} not loaded"
        assert module in conf.content_string.split()


def test_sysctls_in_effect_and_persistent(host):
    conf = host.file("/etc/sysctl.d/90-k3s.conf").content_string
    for key, value in SYSCTLS.items():
        assert host.sysctl(key) == value, key
        assert f"{key} = {value}" in conf


def test_time_sync_and_no_host_firewall(host):
    chrony = host.service("chrony")
    assert chrony.is_running and chrony.is_enabled
    ufw = host.service("ufw")
    assert not ufw.is_running and not ufw.is_enabled


# -- airgap install, up to the line ------------------------------------------------------------
def test_stand_in_binary_installed_but_k3s_not_started(host):
    binary = host.file("/usr/local/bin/k3s")
    assert binary.mode == 0o755 and binary.user == "root"
    assert "stand-in" in binary.content_string  # the test's stand-in: the line is starting k3s
    images = host.file("/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst")
    assert images.exists and images.mode == 0o600
    unit = "k3s" if is_server(host) else "k3s-agent"
    unit_file = host.file(f"/etc/systemd/system/{unit}.service")
    assert unit_file.exists and "ExecStart=/usr/local/bin/k3s " in unit_file.content_string
    assert host.run(f"systemctl cat {unit}.service").rc == 0, "systemd does not know the unit (daemon-reload)"
    assert not host.service(unit).is_running


def test_token_file_private_and_shared(host):
    token = host.file("/etc/rancher/k3s/cluster-token")
    assert token.mode == 0o600 and token.user == "root"
    value = token.content_string.strip()
    assert len(value) == 64 and int(value, 16) >= 0
    assert host.file("/etc/rancher/k3s").mode == 0o700


def test_config_keys_are_documented_k3s_flags(host):
    merged, raw_keys = merged_config(host)
    documented = SERVER_FLAGS if is_server(host) else AGENT_FLAGS
    unknown = {k.rstrip("+") for k in raw_keys} - documented
    assert not unknown, f"not k3s {'server' if is_server(host) else 'agent'} flags: {unknown}"
    assert merged["token-file"] == "/etc/rancher/k3s/cluster-token"
    # node-name set explicitly: the lowercased full host name, as k3s would choose it
    assert merged["node-name"] == host.check_output("uname -n").strip().lower()
    assert merged["protect-kernel-defaults"] is True
    assert arg_names(merged["kubelet-arg"]) <= KUBELET_FLAGS
    assert "streaming-connection-idle-timeout=5m" in merged["kubelet-arg"]
    for path in ["/etc/rancher/k3s/config.yaml"] + [
        f"/etc/rancher/k3s/config.yaml.d/{n}" for n in host.file("/etc/rancher/k3s/config.yaml.d").listdir()
    ]:
        assert host.file(path).mode == 0o600, path


# -- k3s_server + k3s_networking + k3s_hardening (server) ---------------------------------------
def test_server_config(host):
    if not is_server(host):
        return
    merged, _ = merged_config(host)
    assert merged["cluster-init"] is True and "server" not in merged
    assert "k3s.lab.example" in merged["tls-san"]
    assert merged["write-kubeconfig-mode"] == "0600"
    assert "lab.example/role=infra" in merged["node-label"]
    # networking: Cilium replaces flannel, the network policy controller and kube-proxy
    assert merged["flannel-backend"] == "none"
    assert merged["disable-network-policy"] is True
    assert merged["disable-kube-proxy"] is True
    # hardening
    assert merged["secrets-encryption"] is True
    api = merged["kube-apiserver-arg"]
    assert arg_names(api) <= KUBE_APISERVER_FLAGS
    for arg in (
        "enable-admission-plugins=NodeRestriction,EventRateLimit",
        "admission-control-config-file=/var/lib/rancher/k3s/server/lab-admission.yaml",
        "audit-policy-file=/var/lib/rancher/k3s/server/lab-audit-policy.yaml",
        "audit-log-path=/var/lib/rancher/k3s/server/logs/audit.log",
        "audit-log-maxage=30",
        "audit-log-maxbackup=10",
        "audit-log-maxsize=100",
    ):
        assert arg in api
    assert any(a.startswith("tls-cipher-suites=TLS_ECDHE_") for a in api)
    assert arg_names(merged["kube-controller-manager-arg"]) <= KUBE_CONTROLLER_MANAGER_FLAGS


def test_cilium_helmchart_manifest(host):
    if not is_server(host):
        return
    doc = read_yaml(host, "/var/lib/rancher/k3s/server/manifests/cilium.yaml")
    assert doc["apiVersion"] == "helm.cattle.io/v1" and doc["kind"] == "HelmChart"
    assert doc["metadata"] == {"name": "cilium", "namespace": "kube-system"}
    spec = doc["spec"]
    assert set(spec) <= HELMCHART_SPEC_FIELDS, set(spec) - HELMCHART_SPEC_FIELDS
    assert spec["chart"] == "cilium" and spec["repo"] == "https://helm.cilium.io/"
    assert spec["bootstrap"] is True and spec["targetNamespace"] == "kube-system"
    values = yaml.safe_load(spec["valuesContent"])
    assert set(values) <= CILIUM_VALUES, set(values) - CILIUM_VALUES
    assert values["kubeProxyReplacement"] is True
    assert values["k8sServicePort"] == 6443 and values["k8sServiceHost"]
    assert values["routingMode"] == "tunnel" and values["tunnelProtocol"] == "vxlan"
    assert values["hubble"]["enabled"] is True and values["hubble"]["relay"]["enabled"] is True
    assert values["ipam"] == {"mode": "kubernetes"}
    # k3s's static CNI bin dir (k3s-io/k3s #10869); containerd's config.toml is checked after a real start
    assert values["cni"] == {"binPath": "/var/lib/rancher/k3s/data/cni", "confPath": "/var/lib/rancher/k3s/agent/etc/cni/net.d"}
    # one API endpoint for every server: the first server's address (the API endpoint in tls-san)
    merged, _ = merged_config(host)
    assert values["k8sServiceHost"] == merged["tls-san"][0]


def test_admission_audit_and_network_policies(host):
    if not is_server(host):
        return
    server = "/var/lib/rancher/k3s/server"
    for path in (f"{server}/lab-admission.yaml", f"{server}/lab-audit-policy.yaml"):
        assert host.file(path).mode == 0o600 and host.file(path).user == "root"
    assert host.file(f"{server}/logs").mode == 0o700
    admission = read_yaml(host, f"{server}/lab-admission.yaml")
    assert admission["kind"] == "AdmissionConfiguration"
    plugins = {p["name"]: p["configuration"] for p in admission["plugins"]}
    psa = plugins["PodSecurity"]
    assert psa["defaults"]["enforce"] == "restricted"
    assert psa["exemptions"]["namespaces"] == ["kube-system", "longhorn-system"]
    assert plugins["EventRateLimit"]["limits"][0]["type"] == "Server"
    audit = read_yaml(host, f"{server}/lab-audit-policy.yaml")
    assert audit["kind"] == "Policy" and audit["rules"]
    policies = list(yaml.safe_load_all(host.file(f"{server}/manifests/lab-network-policies.yaml").content_string))
    policies = [p for p in policies if p]
    assert {p["metadata"]["namespace"] for p in policies} == {"default", "kube-public", "kube-node-lease"}
    assert all(p["kind"] == "NetworkPolicy" and p["spec"]["policyTypes"] == ["Ingress"] for p in policies)


# -- Longhorn prerequisites on servers and agents ------------------------------------------------------
def test_longhorn_prerequisites(host):
    for package in ("open-iscsi", "nfs-common"):
        assert host.package(package).is_installed
    iscsid = host.service("iscsid")
    assert iscsid.is_running and iscsid.is_enabled
    assert host.file("/var/lib/longhorn").is_directory and host.file("/var/lib/longhorn").mode == 0o700
    dropin = host.file("/etc/multipath/conf.d/lab-longhorn.conf").content_string
    assert 'devnode "^sd[a-z0-9]+"' in dropin and "blacklist {" in dropin


# -- k3s_agent -----------------------------------------------------------------------------------
def test_agent_config_and_longhorn_prerequisites(host):
    if is_server(host):
        return
    merged, _ = merged_config(host)
    assert merged["server"].startswith("https://") and merged["server"].endswith(":6443")
    assert "secrets-encryption" not in merged and "kube-apiserver-arg" not in merged
    assert "lab.example/role=worker" in merged["node-label"]
    for package in ("open-iscsi", "nfs-common"):
        assert host.package(package).is_installed
    iscsid = host.service("iscsid")
    assert iscsid.is_running and iscsid.is_enabled
    longhorn = host.file("/var/lib/longhorn")
    assert longhorn.is_directory and longhorn.mode == 0o700


def test_agent_got_the_servers_join_token(host, request):
    if is_server(host):
        return
    import testinfra

    server = testinfra.get_host("ansible://k3s-server-1", ansible_inventory=request.config.getoption("ansible_inventory"))
    token = "/etc/rancher/k3s/cluster-token"
    assert host.file(token).content_string.strip() == server.file(token).content_string.strip()
