#!/usr/bin/python
# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_machine
short_description: Desired state of a machine on a lab-platform bastion
version_added: 0.1.0
description:
  - Queues an install with its parameters, queues the reinstall of an installed machine, cancels a
    queued, running or failed install, requests a one-shot debug boot, or forgets a machine.
  - Idempotent. An install that is already queued, running or done with the same parameters is
    left alone; so is a reinstall that is already queued, an install that is already cancelled, a
    pending debug boot of the same mode and a machine that is already gone.
  - Re-queueing with other parameters reports what changed (RV(changes)); the bastion records it in
    the machine's event.
  - The bastion validates every value (MAC, host name, role, OS, disk, SSH keys); its error is
    reported as the module's failure and nothing is changed.
author:
  - lab-platform maintainers (@lab-platform)
extends_documentation_fragment:
  - lab.platform.bastion
  - lab.platform.attributes
options:
  mac:
    description: MAC address of the machine (any common form; the bastion normalises it).
    type: str
    required: true
  state:
    description:
      - V(queued) queues an install with O(hostname), O(role), O(os), O(disk) and O(ssh_keys). The
        machine must be known to the bastion (it PXE-booted and was discovered).
      - V(reprovisioned) queues the reinstall of an installed machine with its current parameters, or
        with another O(os) or O(role) when given. A reinstall wipes the target disk.
      - V(cancelled) withdraws a queued, running or failed install; the machine is discovered again.
      - V(debug) requests a one-shot debug boot of mode O(debug_mode) for the machine's next PXE boot.
      - V(absent) forgets the machine.
    type: str
    choices: [queued, reprovisioned, cancelled, debug, absent]
    default: queued
  hostname:
    description: Host name to install (RFC 1123). Required with O(state=queued).
    type: str
  role:
    description: Role to install. Required with O(state=queued); with O(state=reprovisioned), a new role.
    type: str
    choices: [vanilla, worker, infra, labcontroller]
  os:
    description: Operating system to install. Required with O(state=queued); with O(state=reprovisioned), another OS.
    type: str
    choices: [fedora-43, ubuntu-26.04, debian-12, debian-13]
  disk:
    description: Target disk such as C(/dev/nvme0n1); empty lets the installer pick (NVMe first).
    type: str
    default: ""
  ssh_keys:
    description: SSH public keys authorised on the installed machine.
    type: list
    elements: str
    default: []
  reprovision:
    description:
      - When the machine is installed with other parameters, reinstall it with these (V(true)) or fail
        (V(false)). A reinstall wipes the target disk.
    type: bool
    default: false
  debug_mode:
    description: Debug environment for O(state=debug) (rescue system, or the iPXE shell).
    type: str
    choices: [rescue, pxe]
    default: rescue
"""

EXAMPLES = r"""
- name: Queue the install of node1
  lab.platform.lab_machine:
    url: http://10.0.0.2:8080
    token: "{{ lab_bastion_token }}"
    mac: "52:54:00:12:34:56"
    hostname: node1
    role: worker
    os: fedora-43
    ssh_keys:
      - "{{ lookup('ansible.builtin.file', '~/.ssh/id_ed25519.pub') }}"

- name: Reinstall node1 (installed) as an infra machine
  lab.platform.lab_machine:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:56"
    state: reprovisioned
    role: infra

- name: Withdraw the install of node2
  lab.platform.lab_machine:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:58"
    state: cancelled

- name: Boot node1 into the rescue system once
  lab.platform.lab_machine:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:56"
    state: debug

- name: Forget a retired machine
  lab.platform.lab_machine:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:57"
    state: absent
"""

RETURN = r"""
machine:
  description: The machine as the bastion shows it after the change (before it, in check mode); empty once forgotten.
  returned: always
  type: dict
  sample:
    mac: "52:54:00:12:34:56"
    state: install_queued
    hostname: node1
    role: worker
    os: fedora-43
    disk: ""
    ssh_keys: []
    ip: 10.0.0.31
    debug: null
action:
  description: What was (or, in check mode, would be) asked of the bastion.
  returned: always
  type: str
  sample: install
  choices: [none, install, reprovision, cancel, debug, forget]
changes:
  description: The install parameters that a re-queue or reinstall changes, each as [before, after].
  returned: always
  type: dict
  sample:
    role: [worker, infra]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lab.platform.plugins.module_utils.lab_client import (
    LabClientError,
    client_from_module,
    lab_argument_spec,
)

INSTALL_FIELDS = ("hostname", "role", "os", "disk", "ssh_keys")
SHOWN = ("state", "hostname", "role", "os", "disk", "ssh_keys", "debug")
#: where an install can be cancelled (the bastion's lifecycle table: cancel -> discovered)
CANCELLABLE = ("install_queued", "installing", "failed")


def summary(machine):
    return {k: machine.get(k) for k in SHOWN} if machine else {}


def changes(before, after):
    """{param: [before, after]} of the install parameters a re-queue changes (as the bastion records them)."""
    return dict((k, [before.get(k), after.get(k)]) for k in ("hostname", "role", "os", "disk")
                if before.get(k) is not None and after.get(k) is not None and before.get(k) != after.get(k))


def plan(machine, params):
    """Decide what to ask of the bastion: (action, after-summary). Raises ValueError if impossible."""
    state = params["state"]
    before = summary(machine)
    if state == "absent":
        return ("forget", {}) if machine else ("none", {})
    if machine is None:
        raise ValueError("the bastion does not know %s; it must PXE-boot once to be discovered" % params["mac"])
    if state == "debug":
        if machine.get("debug") == params["debug_mode"]:
            return "none", before
        return "debug", dict(before, debug=params["debug_mode"])
    if state == "cancelled":
        if machine.get("state") in CANCELLABLE:
            return "cancel", dict(before, state="discovered")
        return "none", before
    if state == "reprovisioned":
        return plan_reprovision(machine, params, before)
    wanted = {k: params[k] for k in INSTALL_FIELDS}
    same = all((machine.get(k) or ([] if k == "ssh_keys" else "")) == wanted[k] for k in INSTALL_FIELDS)
    current = machine.get("state")
    after = dict(before, state="install_queued", **wanted)
    if current in ("discovered", "failed") or (current == "install_queued" and not same):
        return "install", after
    if same:
        return "none", before
    if current == "installed":
        if params["reprovision"]:
            return "reprovision", after
        raise ValueError("%s is installed as %s (%s, %s); set reprovision=true to reinstall it with the new parameters"
                         % (params["mac"], machine.get("hostname"), machine.get("role"), machine.get("os")))
    raise ValueError("%s is %s with other parameters; cancel that install first" % (params["mac"], current))


def plan_reprovision(machine, params, before):
    """state=reprovisioned: an installed machine is reinstalled (with another os/role if given); a
    queued reinstall is left alone, or re-queued when os/role differ; anything else is an error."""
    wanted = dict((k, params[k]) for k in ("role", "os") if params.get(k))
    after = dict(before, state="install_queued", **wanted)
    current = machine.get("state")
    if current == "installed":
        return "reprovision", after
    if current == "install_queued":
        return ("install", after) if changes(before, after) else ("none", before)
    if current == "installing" and not changes(before, after):
        return "none", before
    raise ValueError("%s is %s, not installed; %s" % (
        params["mac"], current, "cancel that install first" if current == "installing" else "queue an install with state=queued"))


def main():
    spec = lab_argument_spec()
    spec.update(
        mac=dict(type="str", required=True),
        state=dict(type="str", default="queued", choices=["queued", "reprovisioned", "cancelled", "debug", "absent"]),
        hostname=dict(type="str"),
        role=dict(type="str", choices=["vanilla", "worker", "infra", "labcontroller"]),
        os=dict(type="str", choices=["fedora-43", "ubuntu-26.04", "debian-12", "debian-13"]),
        disk=dict(type="str", default=""),
        ssh_keys=dict(type="list", elements="str", default=[], no_log=False),
        reprovision=dict(type="bool", default=False),
        debug_mode=dict(type="str", default="rescue", choices=["rescue", "pxe"]),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "queued", ("hostname", "role", "os"))])
    client = client_from_module(module)
    p = module.params
    try:
        machine = client.machine(p["mac"])
        if machine:
            machine.pop("events", None)
        action, after = plan(machine, p)
        result = dict(changed=action != "none", action=action, machine=machine or {},
                      changes=changes(summary(machine), after) if action in ("install", "reprovision") else {},
                      diff=dict(before=summary(machine), after=after))
        if action == "none" or module.check_mode:
            module.exit_json(**result)
        mac = machine["mac"]
        if action == "install":
            result["machine"] = client.install(mac, dict((k, after[k]) for k in INSTALL_FIELDS))
        elif action == "reprovision":
            fields = INSTALL_FIELDS if p["state"] == "queued" else ("role", "os")
            result["machine"] = client.reprovision(mac, dict((k, p[k]) for k in fields if p[k] is not None),
                                                   reason="lab.platform.lab_machine")
        elif action == "cancel":
            result["machine"] = client.cancel(mac, reason="lab.platform.lab_machine")
        elif action == "debug":
            result["machine"] = client.debug(mac, p["debug_mode"])
        elif action == "forget":
            client.forget(mac)
            result["machine"] = {}
        module.exit_json(**result)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    except LabClientError as exc:
        module.fail_json(msg=str(exc), status=exc.status, error=exc.error, detail=exc.detail)


if __name__ == "__main__":
    main()
