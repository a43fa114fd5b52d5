# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: lab
short_description: Machines of lab-platform bastions, or servers of labd, as an inventory
version_added: 0.1.0
description:
  - Reads the machines of each bastion with C(GET /api/machines), one request per page of 1000 machines
    (so exactly one per bastion for fleets of up to 1000), and turns them into hosts, groups and host
    variables.
  - "A labd source (C(kind: labd)) is read the same way with C(GET /api/v1/servers) (one request per page of
    1000 servers) and gives the same groups and host variables; C(lab_bastion) is then the server's bastion
    name, and the servers' clouds, environments and labels add the groups C(lab_cloud_<cloud>),
    C(lab_env_<environment>) and C(lab_label_<key>_<value>) and the host variables C(lab_cloud),
    C(lab_environment), C(lab_labels) and C(lab_server_id)."
  - Only installed machines are hosts by default; O(states) adds machines in other states.
  - "Values that a machine controls (its hardware report, C(lab_hardware), and the C(lab_cpu_*),
    C(lab_dmi_*), C(lab_disks) and C(lab_nics) facts) are marked unsafe wherever they could be a
    template (a string with a curly bracket, as community.general's inventory plugins do), so that a DMI
    product name of C({{ lookup('pipe', 'id') }}) is never templated."
  - Host names, C(ansible_host), addresses, MACs, states, roles, OSes and numbers are plain values (the
    bastion validated them), which keeps C(ansible-inventory --list --export) readable for AWX's
    inventory sync (unsafe-wrapped plain scalars broke it, community.general issue 8212).
  - Default groups are C(lab_state_<state>), C(lab_role_<role>), C(lab_os_<os>) and
    C(lab_bastion_<name>); C(compose), C(groups) and C(keyed_groups) add more.
  - "Host variables: C(lab_mac), C(lab_ip), C(lab_role), C(lab_os), C(lab_state), C(lab_hostname),
    C(lab_bastion), C(lab_hardware) (the full hardware inventory) and the flattened hardware facts
    C(lab_firmware), C(lab_memory_mb), C(lab_cpu_model), C(lab_cpu_cores), C(lab_cpu_threads),
    C(lab_cpu_arch), C(lab_dmi_vendor), C(lab_dmi_product), C(lab_dmi_serial), C(lab_disks), C(lab_nics).
    C(ansible_host) is the machine's address when it is installed, or when it was installed and its
    reinstall is queued (the running system keeps its address until it reboots into the installer)."
  - The configuration file must be named C(lab.yml), C(lab.yaml) or end in C(.lab.yml) / C(.lab.yaml).
author:
  - lab-platform maintainers (@lab-platform)
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: The name of this plugin; it makes a YAML file an inventory source of this plugin.
    type: str
    required: true
    choices: [lab.platform.lab]
  sources:
    description:
      - Base URLs of the bastions (or labd) to read, for example C(http://10.0.0.2:8080).
      - Each source is read with one HTTP request per page of 1000 machines.
      - An item may also be a mapping with C(url) and optionally C(token), C(name) (the bastion's
        group name; default derived from the URL's host and port), C(kind) (C(bastion), the default, or
        C(labd)) and C(ca_file) (overrides O(ca_file) for this source).
    type: list
    elements: raw
    required: true
    env:
      - name: LAB_BASTION_URL
  token:
    description:
      - Operator token (the output of C(lab-bastion token)), sent as a bearer token to every source without
        a token of its own.
    type: str
    env:
      - name: LAB_BASTION_TOKEN
  labd_token:
    description:
      - API token of labd (C(labctl login) stores one; C(labctl create token) makes another), sent to every labd
        source without a token of its own. Without it, labd sources get O(token).
    type: str
    env:
      - name: LAB_LABD_TOKEN
  ca_file:
    description:
      - CA certificate file to verify C(https://) sources with, for example labd's own CA as C(labctl login)
        pinned it (C(~/.labctl/ca/<context>.pem)). Default is the system's trust store.
    type: path
    env:
      - name: LAB_CA_FILE
  states:
    description:
      - Lifecycle states whose machines become hosts. The default lists only installed machines; add
        C(discovered), C(install_queued), C(installing) and C(failed) to see the rest.
      - Machines without a host name get one derived from their MAC, C(lab-525400123456).
    type: list
    elements: str
    default: [installed]
    choices: [discovered, install_queued, installing, installed, failed]
  group_prefix:
    description: Prefix of the default group names.
    type: str
    default: lab_
  timeout:
    description: Seconds to wait for each bastion.
    type: int
    default: 30
  validate_certs:
    description: Verify TLS certificates of C(https://) sources.
    type: bool
    default: true
"""

EXAMPLES = r"""
# lab.yml: every installed machine of one bastion, token from LAB_BASTION_TOKEN
plugin: lab.platform.lab
sources:
  - http://10.0.0.2:8080

---
# lab.yml: two bastions, all machines, extra groups, cached for 10 minutes
# (if a bastion is down, its cached machines are used with a warning)
plugin: lab.platform.lab
sources:
  - http://bastion-a.lab:8080
  - url: http://bastion-b.lab:8080
    token: "{{ lookup('ansible.builtin.env', 'BASTION_B_TOKEN') }}"
    name: rack_b
states: [discovered, install_queued, installing, installed, failed]
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/lab-inventory
cache_timeout: 600
compose:
  ansible_user: "'fedora' if lab_os == 'fedora-43' else 'ubuntu'"
groups:
  uefi: lab_firmware == 'uefi'
  big: lab_memory_mb >= 65536
keyed_groups:
  - key: lab_dmi_vendor
    prefix: vendor

---
# lab.yml: every installed server labd knows (all bastions), with lab_cloud_*, lab_env_* and
# lab_label_* groups; token from LAB_LABD_TOKEN, TLS verified with labd's CA as labctl pinned it
plugin: lab.platform.lab
sources:
  - url: https://labd.lab:8443
    kind: labd
ca_file: ~/.labctl/ca/labd.lab.pem
"""

import re

from ansible.errors import AnsibleParserError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var
from ansible_collections.lab.platform.plugins.module_utils.lab_client import LabClient, LabClientError

try:  # ansible-core 2.19+: strings from an inventory plugin are untrusted (exported as unsafe) unless trusted
    from ansible.template import trust_as_template
except ImportError:  # ansible-core 2.18: strings are plain unless wrapped by wrap_var
    def trust_as_template(value):
        return value

_NOT_GROUP_CHARS = re.compile(r"[^A-Za-z0-9_]")
_TEMPLATE_CHARS = re.compile(r"[{}]")


def group_name(value):
    return _NOT_GROUP_CHARS.sub("_", value)


def host_name(machine):
    return machine.get("hostname") or "lab-" + (machine.get("mac") or "").replace(":", "").lower()


def plain(value):
    """A string that cannot be a template (no curly bracket) as a plain value, also for ansible-core
    2.19's ansible-inventory --export; other values as they are."""
    return trust_as_template(value) if isinstance(value, str) and not _TEMPLATE_CHARS.search(value) else value


def machine_controlled(value):
    """A value from the machine's own report with every string (keys too) that could be a template
    marked unsafe; the rest stays plain, so --export shows it as it is."""
    if isinstance(value, str):
        return wrap_var(value) if _TEMPLATE_CHARS.search(value) else plain(value)
    if isinstance(value, dict):
        return dict((machine_controlled(k), machine_controlled(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [machine_controlled(v) for v in value]
    return value


def host_vars(machine, bastion, labd=False):
    """The host variables of one machine (or labd server): plain validated scalars, the hardware
    report (and a server's labels) through machine_controlled()."""
    hw = machine_controlled(machine.get("hardware") or {})
    cpu = hw.get("cpu") or {}
    dmi = hw.get("dmi") or {}
    hv = {
        "lab_mac": machine.get("mac"),
        "lab_ip": machine.get("ip"),
        "lab_role": machine.get("role"),
        "lab_os": machine.get("os"),
        "lab_state": machine.get("state"),
        "lab_hostname": machine.get("hostname"),
        "lab_bastion": bastion,
        "lab_hardware": hw,
        "lab_firmware": hw.get("firmware"),
        "lab_memory_mb": hw.get("memory_mb"),
        "lab_cpu_model": cpu.get("model"),
        "lab_cpu_cores": cpu.get("cores"),
        "lab_cpu_threads": cpu.get("threads"),
        "lab_cpu_arch": cpu.get("arch"),
        "lab_dmi_vendor": dmi.get("vendor"),
        "lab_dmi_product": dmi.get("product"),
        "lab_dmi_serial": dmi.get("serial"),
        "lab_disks": hw.get("disks") or [],
        "lab_nics": hw.get("nics") or [],
    }
    if labd:
        hv.update(lab_bastion=machine.get("bastion"), lab_cloud=machine.get("cloud"),
                  lab_environment=machine.get("environment"), lab_server_id=machine.get("id"),
                  lab_labels=machine_controlled(machine.get("labels") or {}))
    running = machine.get("state") == "installed" or (machine.get("state") == "install_queued" and machine.get("installed_at"))
    if running and machine.get("ip"):  # an installed system, still running while its reinstall is queued
        hv["ansible_host"] = machine["ip"]
    return dict((k, plain(v)) for k, v in hv.items())


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "lab.platform.lab"

    def verify_file(self, path):
        if not super().verify_file(path):
            return False
        return path.endswith(("/lab.yml", "/lab.yaml", ".lab.yml", ".lab.yaml")) or path in ("lab.yml", "lab.yaml")

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path)
        self._read_config_data(path)
        sources = self._sources()
        cache_key = self.get_cache_key(path)
        machines_by_source = self._fetch(sources, cache_key, cache)
        states = set(self.get_option("states"))
        for src in sources:
            for machine in machines_by_source.get(src["url"], []):
                if isinstance(machine, dict) and machine.get("state") in states and machine.get("mac"):
                    self._add_machine(machine, src)

    def _sources(self):
        tokens = {}
        for kind, option in (("bastion", "token"), ("labd", "labd_token")):
            tokens[kind] = self.get_option(option)
            if tokens[kind] is not None and self.templar.is_template(tokens[kind]):
                tokens[kind] = self.templar.template(tokens[kind])
        tokens["labd"] = tokens["labd"] or tokens["bastion"]
        out, seen = [], set()
        for item in self.get_option("sources") or []:
            if isinstance(item, str):
                item = {"url": item}
            if not isinstance(item, dict) or not item.get("url"):
                raise AnsibleParserError("lab inventory: each item of 'sources' must be a URL or a mapping with 'url'")
            url = to_text(item["url"]).rstrip("/")
            if url in seen:
                continue
            seen.add(url)
            kind = item.get("kind", "bastion")
            if kind not in tokens:
                raise AnsibleParserError("lab inventory: source %s: kind must be bastion or labd, not %r" % (url, kind))
            token = item.get("token", tokens[kind])
            if token is not None and self.templar.is_template(token):
                token = self.templar.template(token)
            name = item.get("name") or url.split("://", 1)[-1].split("/", 1)[0]
            out.append({"url": url, "token": token, "name": group_name(to_text(name)), "labd": kind == "labd",
                        "ca_file": item.get("ca_file") or self.get_option("ca_file")})
        if not out:
            raise AnsibleParserError("lab inventory: 'sources' lists no bastion URL")
        return out

    def _fetch(self, sources, cache_key, cache):
        """The only place that talks to bastions or the cache: {url: [machine, ...]}.

        One GET /api/machines (labd: /api/v1/servers) per source and page of 1000. A source that cannot be read falls back to its cached
        machines (with a warning) when caching is enabled and the cache has them; else it is an error."""
        use_cache = bool(self.get_option("cache"))
        cached = {}
        if use_cache:
            try:
                cached = self._cache[cache_key] or {}
            except KeyError:
                cached = {}
        result = {}
        for src in sources:
            url = src["url"]
            if use_cache and cache and url in cached:
                result[url] = cached[url]
                continue
            client = LabClient(url, src["token"], self.get_option("timeout"), self.get_option("validate_certs"),
                               ca_path=src["ca_file"])
            try:
                result[url] = client.servers() if src["labd"] else client.machines()
            except LabClientError as exc:
                if use_cache and url in cached:
                    self.display.warning("lab inventory: %s; using the cached machines of %s" % (exc, url))
                    result[url] = cached[url]
                else:
                    raise AnsibleParserError("lab inventory: %s" % exc)
        if use_cache:
            self._cache[cache_key] = result
        return result

    def _add_machine(self, machine, src):
        prefix = self.get_option("group_prefix")
        strict = self.get_option("strict")
        host = self.inventory.add_host(host_name(machine))
        hv = host_vars(machine, src["url"], src["labd"])
        for key, value in hv.items():
            self.inventory.set_variable(host, key, value)
        kinds = [("state", machine.get("state")), ("role", machine.get("role")), ("os", machine.get("os"))]
        if src["labd"]:
            labels = machine.get("labels") if isinstance(machine.get("labels"), dict) else {}
            kinds += [("bastion", machine.get("bastion")), ("cloud", machine.get("cloud")),
                      ("env", machine.get("environment"))]
            kinds += [("label", "%s_%s" % (k, v)) for k, v in sorted(labels.items())]
        else:
            kinds.append(("bastion", src["name"]))
        for kind, value in kinds:
            if value:
                self.inventory.add_child(self.inventory.add_group(group_name("%s%s_%s" % (prefix, kind, to_text(value)))), host)
        self._set_composite_vars(self.get_option("compose"), hv, host, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), hv, host, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hv, host, strict=strict)
