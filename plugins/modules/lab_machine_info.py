#!/usr/bin/python
# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_machine_info
short_description: Read machines from a lab-platform bastion
version_added: 0.1.0
description:
  - Returns one machine (with its recent events) when O(mac) is given, else every machine, optionally
    filtered by O(machine_state), O(role) and O(os), in one request per page of 1000 machines.
author:
  - lab-platform maintainers (@lab-platform)
extends_documentation_fragment:
  - lab.platform.bastion
attributes:
  check_mode:
    description: Reads only; runs the same in check mode.
    support: full
  diff_mode:
    description: Changes nothing, so there is no diff.
    support: none
options:
  mac:
    description: MAC address of one machine. An unknown MAC returns an empty list.
    type: str
  machine_state:
    description: Only machines in this lifecycle state.
    type: str
    choices: [discovered, install_queued, installing, installed, failed]
  role:
    description: Only machines with this role.
    type: str
    choices: [vanilla, worker, infra, labcontroller]
  os:
    description: Only machines with this operating system.
    type: str
    choices: [fedora-43, ubuntu-26.04, debian-12, debian-13]
"""

EXAMPLES = r"""
- name: Read every failed install
  lab.platform.lab_machine_info:
    url: http://10.0.0.2:8080
    machine_state: failed
  register: failed

- name: Read one machine with its events
  lab.platform.lab_machine_info:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:56"
  register: node1
"""

RETURN = r"""
machines:
  description: The machines, as the bastion shows them (with C(events) when O(mac) is given).
  returned: always
  type: list
  elements: dict
  sample:
    - mac: "52:54:00:12:34:56"
      state: installed
      hostname: node1
      role: worker
      os: fedora-43
      ip: 10.0.0.31
      hardware: {firmware: uefi, memory_mb: 16384}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lab.platform.plugins.module_utils.lab_client import (
    LabClientError,
    client_from_module,
    lab_argument_spec,
)


def main():
    spec = lab_argument_spec()
    spec.update(
        mac=dict(type="str"),
        machine_state=dict(type="str", choices=["discovered", "install_queued", "installing", "installed", "failed"]),
        role=dict(type="str", choices=["vanilla", "worker", "infra", "labcontroller"]),
        os=dict(type="str", choices=["fedora-43", "ubuntu-26.04", "debian-12", "debian-13"]),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[("mac", "machine_state"), ("mac", "role"), ("mac", "os")])
    client = client_from_module(module)
    p = module.params
    try:
        if p["mac"]:
            machine = client.machine(p["mac"])
            machines = [machine] if machine else []
        else:
            machines = client.machines(state=p["machine_state"], role=p["role"], os=p["os"])
    except LabClientError as exc:
        module.fail_json(msg=str(exc), status=exc.status, error=exc.error, detail=exc.detail)
    module.exit_json(changed=False, machines=machines)


if __name__ == "__main__":
    main()
