"""Names documented by k3s (docs.k3s.io: CLI reference for `k3s server` / `k3s agent`, the
HelmChart CRD of the k3s Helm controller, the CIS hardening guide), used to check that what the
roles render is something k3s reads, not only valid YAML.

Configuration file keys are the flag names without dashes; a trailing "+" appends to a value set
earlier (documented for config.yaml and config.yaml.d/*.yaml).
"""

COMMON_FLAGS = {
    "config", "debug", "v", "vmodule", "log", "alsologtostderr",
    "token", "token-file", "server", "data-dir",
    "node-name", "with-node-id", "node-label", "node-taint",
    "image-credential-provider-bin-dir", "image-credential-provider-config",
    "docker", "container-runtime-endpoint", "default-runtime", "pause-image", "snapshotter",
    "private-registry", "node-ip", "node-external-ip", "resolv-conf",
    "flannel-iface", "flannel-conf", "flannel-cni-conf-dir",
    "kubelet-arg", "kube-proxy-arg", "protect-kernel-defaults", "selinux", "lb-server-port",
    "rootless", "prefer-bundled-bin", "airgap-extra-registry",
}

AGENT_FLAGS = COMMON_FLAGS | {"vpn-auth", "vpn-auth-file", "disable-apiserver-lb"}

SERVER_FLAGS = COMMON_FLAGS | {
    "bind-address", "https-listen-port", "advertise-address", "advertise-port",
    "tls-san", "tls-san-security", "cluster-cidr", "service-cidr", "service-node-port-range",
    "cluster-dns", "cluster-domain", "flannel-backend", "flannel-ipv6-masq", "flannel-external-ip",
    "egress-selector-mode", "servicelb-namespace",
    "write-kubeconfig", "write-kubeconfig-mode", "write-kubeconfig-group", "helm-job-image",
    "agent-token", "agent-token-file", "cluster-init", "cluster-reset", "cluster-reset-restore-path",
    "kube-apiserver-arg", "etcd-arg", "kube-controller-manager-arg", "kube-scheduler-arg",
    "kube-cloud-controller-manager-arg",
    "datastore-endpoint", "datastore-cafile", "datastore-certfile", "datastore-keyfile",
    "etcd-expose-metrics", "etcd-disable-snapshots", "etcd-snapshot-name", "etcd-snapshot-dir",
    "etcd-snapshot-schedule-cron", "etcd-snapshot-retention", "etcd-snapshot-compress",
    "default-local-storage-path", "disable", "disable-scheduler", "disable-cloud-controller",
    "disable-kube-proxy", "disable-network-policy", "disable-helm-controller",
    "secrets-encryption", "secrets-encryption-provider", "enable-pprof", "embedded-registry",
    "supervisor-metrics",
}

# Fields of the HelmChart spec (helm.cattle.io/v1) that k3s's Helm controller reads.
HELMCHART_SPEC_FIELDS = {
    "targetNamespace", "createNamespace", "chart", "version", "repo", "repoCA", "repoCAConfigMap",
    "helmVersion", "set", "valuesContent", "valuesSecrets", "jobImage", "backOffLimit", "timeout",
    "failurePolicy", "authSecret", "authPassCredentials", "dockerRegistrySecret", "chartContent",
    "bootstrap", "podSecurityContext", "securityContext", "insecureSkipTLSVerify", "plainHTTP",
}

# kube-apiserver, kube-controller-manager and kubelet flags the hardening role passes
# (Kubernetes component reference, as used by the k3s CIS hardening guide).
KUBE_APISERVER_FLAGS = {
    "admission-control-config-file", "enable-admission-plugins", "tls-cipher-suites",
    "audit-policy-file", "audit-log-path", "audit-log-maxage", "audit-log-maxbackup",
    "audit-log-maxsize", "service-account-extend-token-expiration", "anonymous-auth",
    "request-timeout", "service-account-lookup",
}
KUBE_CONTROLLER_MANAGER_FLAGS = {"terminated-pod-gc-threshold", "bind-address", "use-service-account-credentials"}
KUBELET_FLAGS = {
    "streaming-connection-idle-timeout", "tls-cipher-suites", "make-iptables-util-chains",
    "event-qps", "rotate-server-certificates", "protect-kernel-defaults",
}

# Cilium Helm values the networking role sets (top-level keys of the chart's values.yaml).
CILIUM_VALUES = {
    "kubeProxyReplacement", "k8sServiceHost", "k8sServicePort", "routingMode", "tunnelProtocol",
    "ipv4NativeRoutingCIDR", "autoDirectNodeRoutes", "ipam", "operator", "hubble", "cni",
    "bpf", "devices", "l2announcements", "externalIPs", "gatewayAPI", "encryption",
}
