"""`labctl app k3s install|health|list`: k3s on the lab's machines, through the lab.platform
collection's playbooks (playbooks/k3s.yml, playbooks/k3s_health.yml) and ansible-runner.

The inventory is the collection's own ``lab.platform.lab`` plugin pointed at the configured bastion,
exactly as AWX or Semaphore use it: labctl writes a ``lab.yml`` for it (the bastion URL; the token
in a private 0600 file read by a lookup, removed after the run) and reads it back with
``ansible-inventory`` to validate and to list clusters, so there is one inventory logic. Installed machines with role infra or
labcontroller are k3s servers, worker machines are agents (the groups ``k3s_servers`` /
``k3s_agents`` that both playbooks use).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import yaml

from labcore import domain, validate
from labctl import errors, output, runner, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx

#: lab roles whose installed machines become k3s servers / agents (passed to k3s.yml as well)
SERVER_ROLES, AGENT_ROLES = domain.K3S_SERVER_ROLES, domain.K3S_AGENT_ROLES
SERVERS_GROUP, AGENTS_GROUP = "k3s_servers", "k3s_agents"
#: the host variable that names a machine's cluster (the k3s_server role's variable)
CLUSTER_VAR = "k3s_server_cluster_name"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- the inventory: the lab.platform.lab plugin ----------------------------------------------------
def plugin_config(url: str, token_file: Path | None = None) -> dict[str, Any]:
    """The lab.yml of the lab.platform.lab plugin for one bastion; the token is read from a file
    (a lookup), so neither lab.yml nor the environment holds it."""
    config: dict[str, Any] = {"plugin": "lab.platform.lab", "sources": [url], "states": ["installed"]}
    if token_file:
        config["token"] = "{{ lookup('ansible.builtin.file', " + json.dumps(str(token_file)) + ") }}"
    config["groups"] = {SERVERS_GROUP: f"lab_role in {list(SERVER_ROLES)}",
                        AGENTS_GROUP: f"lab_role in {list(AGENT_ROLES)}"}
    return config


#: for the plugin: the collection on the path; an inventory it cannot read is an error, never empty
ANSIBLE_ENV = {"ANSIBLE_INVENTORY_UNPARSED_FAILED": "True", "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
               "ANSIBLE_NOCOLOR": "1"}


@contextmanager
def inventory_file(obj: Ctx) -> Iterator[Path]:
    """A lab.yml for the configured bastion (and its 0600 token file) in a private temporary
    directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="labctl-k3s-") as d:
        token_file = None
        if obj.settings["token"]:
            token_file = Path(d) / "token"
            token_file.touch(mode=0o600)
            token_file.write_text(obj.settings["token"])
        path = Path(d) / "lab.yml"
        path.write_text("---\n" + yaml.safe_dump(plugin_config(obj.settings["bastionUrl"], token_file), sort_keys=False))
        yield path


def read_inventory(obj: Ctx, path: Path) -> dict[str, Any]:
    """The inventory as ``ansible-inventory --list`` gives it ({group: {hosts}}, _meta.hostvars)."""
    exe = Path(sys.executable).parent / "ansible-inventory"
    cmd = [str(exe) if exe.exists() else (shutil.which("ansible-inventory") or "ansible-inventory"),
           "-i", str(path), "--list"]
    try:
        env = {k: v for k, v in os.environ.items() if k not in runner.SECRET_ENV}
        p = subprocess.run(cmd, env={**env, **runner.collections_env(), **ANSIBLE_ENV}, capture_output=True,
                           text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.LabctlError(f"ansible-inventory could not run: {exc}", "is ansible-core installed?") from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "lab inventory" in ln), lines[-1] if lines else f"rc {p.returncode}")
        raise errors.LabctlError(f"the lab.platform.lab inventory could not be read: {why}",
                                 "rerun with --debug; check bastionUrl and token (labctl doctor)")
    return _plain(json.loads(p.stdout))


def _plain(value: Any) -> Any:
    """ansible-inventory writes values the plugin marked unsafe as {"__ansible_unsafe": value}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return _plain(value["__ansible_unsafe"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def group_hosts(inv: dict[str, Any], group: str) -> list[str]:
    return list((inv.get(group) or {}).get("hosts") or [])


def clusters(inv: dict[str, Any], default_name: str) -> list[dict[str, Any]]:
    """Servers and agents of the inventory, grouped by (cluster name variable, bastion)."""
    hostvars = (inv.get("_meta") or {}).get("hostvars") or {}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, group in (("servers", SERVERS_GROUP), ("agents", AGENTS_GROUP)):
        for host in group_hosts(inv, group):
            hv = hostvars.get(host) or {}
            key = (str(hv.get(CLUSTER_VAR) or default_name), str(hv.get("lab_bastion") or ""))
            c = found.setdefault(key, {"name": key[0], "bastion": key[1], "servers": [], "agents": []})
            c[kind].append({"name": host, "mac": hv.get("lab_mac"), "ip": hv.get("lab_ip"), "role": hv.get("lab_role")})
    return sorted(found.values(), key=lambda c: (c["name"], c["bastion"]))


def default_cluster_name() -> str:
    """The k3s_server role's default cluster name (its defaults file), else "lab"."""
    try:
        defaults = runner.playbook_path("k3s.yml").parent.parent / "roles/k3s_server/defaults/main.yml"
        return str(yaml.safe_load(defaults.read_text()).get(CLUSTER_VAR) or "lab")
    except (errors.LabctlError, OSError, AttributeError, yaml.YAMLError):
        return "lab"


# -- validation -----------------------------------------------------------------------------------
def limit_for(obj: Ctx, inv: dict[str, Any], target_args: tuple[str, ...]) -> str | None:
    """TARGETS (host name, MAC or IP) -> the --limit of inventory host names; each must be an
    installed server or agent."""
    if not target_args:
        return None
    machines = obj.client.machines()
    by_mac = {hv.get("lab_mac"): host for host, hv in ((inv.get("_meta") or {}).get("hostvars") or {}).items()}
    members = set(group_hosts(inv, SERVERS_GROUP)) | set(group_hosts(inv, AGENTS_GROUP))
    hosts = []
    for t in target_args:
        m = targets.resolve(machines, t)
        name = m.get("hostname") or m["mac"]
        host = by_mac.get(m["mac"])
        if host is None:
            raise errors.UsageError(f"{name} is {m['state']}, not installed: only installed machines are in the inventory",
                                    "labctl get machines shows the states")
        if host not in members:
            raise errors.UsageError(f"{name} has role {m.get('role')}: k3s runs on {'/'.join(SERVER_ROLES)} machines "
                                    f"(servers) and {'/'.join(AGENT_ROLES)} machines (agents)")
        hosts.append(host)
    return ",".join(dict.fromkeys(hosts))


def check_servers(inv: dict[str, Any], *, odd: bool) -> list[str]:
    servers = group_hosts(inv, SERVERS_GROUP)
    if not servers:
        raise errors.UsageError(
            f"no k3s server: the bastion has no installed {' or '.join(SERVER_ROLES)} machine",
            "install one with: labctl provision install TARGET --hostname NAME --role infra --os OS; nothing was run")
    if odd and len(servers) % 2 == 0:
        raise errors.UsageError(
            f"{len(servers)} k3s servers ({', '.join(servers)}): embedded etcd needs an odd number of servers",
            "install or remove an infra machine; nothing was run")
    return servers


def extra_vars(pairs: tuple[str, ...]) -> dict[str, Any]:
    """-e KEY=VALUE (VALUE read as YAML: numbers, booleans, [lists] and {maps} keep their type)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _KEY.match(key):
            raise errors.UsageError(f"invalid -e {pair!r}: expected KEY=VALUE with KEY a variable name", "nothing was run")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def airgap_vars(directory: str | None, cilium_images: tuple[str, ...] = ()) -> dict[str, Any]:
    """The air-gap inputs as the roles' variables: from DIR, the k3s binary, k3s-airgap-images-*.tar*,
    the Cilium chart cilium-<version>.tgz, Cilium's images cilium-images*.tar* and, for the Red Hat
    family, k3s-selinux-*.rpm; --cilium-images FILE adds image archives. Air-gapped, Cilium's chart and
    images are required (no node becomes Ready without them): refused here, before anything runs."""
    out: dict[str, Any] = {}
    images_cilium = [str(Path(f).resolve()) for f in cilium_images]
    if directory:
        d = Path(directory).resolve()
        binary = d / "k3s"
        if not binary.is_file():
            raise errors.UsageError(f"--airgap-dir {d} has no k3s binary (a file named k3s)", "nothing was run")
        images = sorted(str(p) for p in d.glob("k3s-airgap-images-*.tar*"))
        out.update({"k3s_server_airgap_binary": str(binary), "k3s_agent_airgap_binary": str(binary),
                    "k3s_server_airgap_images": images, "k3s_agent_airgap_images": images})
        charts = sorted(p for p in d.glob("cilium-*.tgz") if not p.name.startswith("cilium-images"))
        images_cilium = sorted(str(p) for p in d.glob("cilium-images*.tar*")) + images_cilium
        if not charts or not images_cilium:
            missing = ([] if charts else ["Cilium chart (cilium-<version>.tgz)"]) + (
                [] if images_cilium else ["Cilium images (cilium-images*.tar[.gz|.zst], or --cilium-images FILE)"])
            raise errors.UsageError(f"--airgap-dir {d} has no {' and no '.join(missing)}: air-gapped, no node "
                                    "would get a CNI and become Ready", "nothing was run")
        out.update({"k3s_networking_airgap_enabled": True, "k3s_networking_cilium_chart_archive": str(charts[-1])})
        rpms = sorted(d.glob("k3s-selinux-*.rpm"))
        if rpms:
            out["k3s_host_prep_selinux_rpm"] = str(rpms[-1])
    if images_cilium:
        out["k3s_networking_cilium_images"] = list(dict.fromkeys(images_cilium))
    return out


# -- running a playbook ---------------------------------------------------------------------------
def run(obj: Ctx, book: str, what: str, target_args: tuple[str, ...], extravars: dict[str, Any], *, odd: bool,
        timeout: int, check_mode: bool = False) -> None:
    playbook = runner.playbook_path(book)  # before anything else: a missing playbook runs nothing
    obj.client.machines()  # the bastion answers and takes the token (exit 3/4 otherwise)
    with inventory_file(obj) as inv_path:
        inv = read_inventory(obj, inv_path)
        check_servers(inv, odd=odd)
        limit = limit_for(obj, inv, target_args)
        quiet = obj.output in ("json", "yaml")
        result = runner.run_playbook(playbook, inventory=str(inv_path), extravars=extravars, limit=limit,
                                     name=f"k3s-{what}", timeout=timeout, quiet=quiet, envvars=ANSIBLE_ENV,
                                     check_mode=check_mode)
        if result.run_dir:  # keep the inventory source with the artefacts
            (result.run_dir / "inventory").mkdir(exist_ok=True)
            shutil.copy2(inv_path, result.run_dir / "inventory" / "lab.yml")
    if quiet:
        output.emit({"playbook": book, "status": result.status, "rc": result.rc, "exit_code": result.exit_code,
                     "stats": result.stats, "limit": limit, "run_dir": str(result.run_dir)}, obj.output, lambda: None)
    runner.check(result, f"k3s {what}")


def ssh_vars(ssh_user: str | None, ssh_private_key: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ssh_user:
        out["ansible_user"] = ssh_user
    if ssh_private_key:
        out["ansible_ssh_private_key_file"] = str(Path(ssh_private_key).resolve())
    return out


# -- commands -------------------------------------------------------------------------------------
@click.group()
def app() -> None:
    """Applications on the lab's machines, installed with the lab.platform collection."""


@app.group()
def k3s() -> None:
    """k3s clusters on the lab's machines: install, health, list.

    Installed infra/labcontroller machines are the servers, installed worker machines the agents.
    The inventory is the lab.platform.lab plugin pointed at the configured bastion (as in AWX);
    playbooks run through ansible-runner, their artefacts are kept under ~/.labctl/runs/."""


targets_argument = click.argument("target_args", metavar="[TARGETS]...", nargs=-1, shell_complete=complete_machines)
ssh_options = [
    click.option("--ssh-user", metavar="USER", help="User the playbook logs in as (default: ansible's, or the inventory's)."),
    click.option("--ssh-private-key", type=click.Path(dir_okay=False, exists=True),
                 help="Private key for the playbook's SSH login."),
    click.option("-e", "--extra-var", "extra", multiple=True, metavar="KEY=VALUE",
                 help="Extra variable for the playbook (repeatable; VALUE is read as YAML)."),
    click.option("--timeout", type=click.IntRange(10), default=3600, show_default=True, metavar="SECONDS",
                 help="Limit for the playbook run."),
]


def with_ssh_options(f):
    for opt in reversed(ssh_options):
        f = opt(f)
    return f


@k3s.command()
@targets_argument
@click.option("--cluster", metavar="NAME", help="Cluster name (k3s_server_cluster_name: the kubeconfig is "
              "fetched to ~/.kube/NAME.yaml).")
@click.option("--airgap-dir", type=click.Path(file_okay=False, exists=True), metavar="DIR",
              help="Air-gapped install from DIR: the k3s binary, k3s-airgap-images-*.tar*, the Cilium chart "
                   "cilium-<version>.tgz, Cilium's images cilium-images*.tar* (required) and, for the Red Hat "
                   "family, k3s-selinux-*.rpm.")
@click.option("--cilium-images", "cilium_images", multiple=True, type=click.Path(dir_okay=False, exists=True),
              metavar="FILE", help="Image archive with Cilium's images, copied beside k3s's to every node "
                                   "(repeatable; with or instead of cilium-images*.tar* in --airgap-dir).")
@click.option("--check", "check_mode", is_flag=True, help="Check mode: report what would change, change nothing (--check --diff).")
@with_ssh_options
@output_option
@pass_ctx
def install(obj: Ctx, target_args, cluster, airgap_dir, cilium_images, check_mode, ssh_user, ssh_private_key, extra,
            timeout) -> None:
    """Install or update k3s on the bastion's machines (playbooks/k3s.yml).

    TARGETS (host name, MAC or IP) limit the run. Checked before anything runs: at least one installed server, an odd number of servers (embedded
    etcd), every target an installed server or agent. Exit code: 0, 2 (validation), 10 + ansible rc
    when the play fails (12 a host failed, 14 a host unreachable), 9 timeout."""
    extravars: dict[str, Any] = {"k3s_server_lab_roles": list(SERVER_ROLES), "k3s_agent_lab_roles": list(AGENT_ROLES)}
    if cluster:
        try:
            extravars[CLUSTER_VAR] = validate.hostname(cluster, "cluster")
        except validate.ValidationError as exc:
            raise errors.UsageError(f"invalid --cluster: {exc.message}", "nothing was run") from None
    extravars.update(airgap_vars(airgap_dir, cilium_images))
    extravars.update(ssh_vars(ssh_user, ssh_private_key))
    extravars.update(extra_vars(extra))
    run(obj, "k3s.yml", "install", target_args, extravars, odd=True, timeout=timeout, check_mode=check_mode)


@k3s.command()
@targets_argument
@with_ssh_options
@output_option
@pass_ctx
def health(obj: Ctx, target_args, ssh_user, ssh_private_key, extra, timeout) -> None:
    """Check the k3s cluster (playbooks/k3s_health.yml); changes nothing.

    Services, nodes Ready, API /readyz, kube-system pods, Cilium, secrets encryption, certificate
    expiry. TARGETS (host name, MAC or IP) limit the run. Exit codes as for install."""
    extravars = {**ssh_vars(ssh_user, ssh_private_key), **extra_vars(extra)}
    run(obj, "k3s_health.yml", "health", target_args, extravars, odd=False, timeout=timeout)


CLUSTER_COLUMNS: list[output.Column] = [
    ("NAME", lambda c: c["name"]),
    ("SERVERS", lambda c: len(c["servers"])),
    ("AGENTS", lambda c: len(c["agents"])),
    ("BASTION", lambda c: c["bastion"]),
]
CLUSTER_WIDE: list[output.Column] = CLUSTER_COLUMNS + [
    ("SERVER HOSTS", lambda c: ",".join(h["name"] for h in c["servers"])),
    ("AGENT HOSTS", lambda c: ",".join(h["name"] for h in c["agents"])),
]


@k3s.command("list")
@output_option
@pass_ctx
def list_cmd(obj: Ctx) -> None:
    """List the k3s clusters of the inventory: name, servers, agents, bastion.

    Installed servers and agents grouped by their k3s_server_cluster_name host variable; without
    one (the usual case), one cluster per bastion named after the role's default. -o wide adds
    the host names."""
    obj.client.machines()  # the bastion answers and takes the token (exit 3/4 otherwise)
    with inventory_file(obj) as path:
        found = clusters(read_inventory(obj, path), default_cluster_name())
    output.emit({"clusters": found}, obj.output,
                lambda: output.print_table(found, CLUSTER_WIDE if obj.output == "wide" else CLUSTER_COLUMNS))
