#!/usr/bin/python
# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_power
short_description: Power state of a machine through its BMC, via a lab-platform bastion
version_added: 0.2.0
description:
  - Powers a machine on or off, or power-cycles it, through its BMC (Redfish or IPMI). The bastion
    makes the BMC call and records its result as an event on the machine.
  - Idempotent. O(state=on) on a machine that is on, and O(state=off) on one that is off, change
    nothing. O(state=cycled) always acts (it is a reboot), and O(state=status) never does.
  - Optionally records the machine's BMC first (O(bmc)); the bastion seals the credentials at rest
    and never shows them again, so a BMC that is already recorded with the same driver, address
    and system id is left as it is unless O(update_bmc=true).
  - Check mode asks the BMC for the power state and reports what would change.
author:
  - lab-platform maintainers (@lab-platform)
extends_documentation_fragment:
  - lab.platform.bastion
  - lab.platform.attributes
options:
  mac:
    description: MAC address of the machine (the bastion must know it).
    type: str
    required: true
  state:
    description:
      - V(on) and V(off) switch the machine on or off (off at once, without an OS shutdown).
      - V(cycled) is a hard reset of a machine that is on, power-on of one that is off.
      - V(status) only reports the power state.
    type: str
    choices: ["on", "off", cycled, status]
    default: status
  boot:
    description:
      - Set the next boot device (once) before acting - V(network) (PXE) to reinstall or debug a
        machine, V(disk) for its installed system. With O(state=on) on a machine that is already
        on, nothing is set.
    type: str
    choices: [network, disk]
  bmc:
    description: The machine's BMC, recorded before acting.
    type: dict
    suboptions:
      driver:
        description: How the bastion talks to the BMC.
        type: str
        required: true
        choices: [redfish, ipmi]
      address:
        description: "C([https://|http://]HOST[:PORT]); a scheme for Redfish only (default https)."
        type: str
        required: true
      username:
        description: The BMC user.
        type: str
        required: true
      password:
        description: The BMC password.
        type: str
        required: true
      system_id:
        description: Redfish only - the system id (default - the BMC's only system).
        type: str
      verify_tls:
        description: Redfish over https - check the BMC's certificate.
        type: bool
        default: true
  update_bmc:
    description: Record O(bmc) even when the same driver, address and system id are recorded (new credentials).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Record node1's BMC and power it on
  lab.platform.lab_power:
    url: http://10.0.0.2:8080
    token: "{{ lab_bastion_token }}"
    mac: "52:54:00:12:34:56"
    state: "on"
    bmc:
      driver: redfish
      address: https://10.0.1.56
      username: admin
      password: "{{ vault_bmc_password }}"

- name: PXE-boot node1 into its queued reinstall
  lab.platform.lab_power:
    url: http://10.0.0.2:8080
    mac: "52:54:00:12:34:56"
    state: cycled
    boot: network
"""

RETURN = r"""
power:
  description: The power state after the task (in check mode, as it would be).
  returned: always
  type: str
  sample: "on"
before:
  description: The power state before the task.
  returned: always
  type: str
  sample: "off"
bmc:
  description: The BMC record (never its credentials).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lab.platform.plugins.module_utils.lab_client import (
    LabClientError,
    client_from_module,
    lab_argument_spec,
)

ACTIONS = {"on": "on", "off": "off", "cycled": "cycle"}


def plan(before, state):
    """(action or None, power after) for a power state ``before`` and the wanted ``state``."""
    if state == "status" or (state == "on" and before == "on") or (state == "off" and before == "off"):
        return None, before
    return ACTIONS[state], "off" if state == "off" else "on"


def bmc_differs(record, wanted):
    if record is None or not record.get("credentials"):
        return True
    return any(record.get(k) != wanted.get(k) for k in ("driver", "address", "system_id"))


def main():
    spec = lab_argument_spec()
    spec.update(
        mac=dict(type="str", required=True),
        state=dict(type="str", default="status", choices=["on", "off", "cycled", "status"]),
        boot=dict(type="str", choices=["network", "disk"]),
        bmc=dict(type="dict", options=dict(
            driver=dict(type="str", required=True, choices=["redfish", "ipmi"]),
            address=dict(type="str", required=True),
            username=dict(type="str", required=True),
            password=dict(type="str", required=True, no_log=True),
            system_id=dict(type="str"),
            verify_tls=dict(type="bool", default=True),
        )),
        update_bmc=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    client = client_from_module(module)
    p = module.params
    try:
        record = client.bmc(p["mac"])
        changed = False
        if p["bmc"]:
            wanted = dict((k, v) for k, v in p["bmc"].items() if v is not None)
            if p["update_bmc"] or bmc_differs(record, wanted):
                changed = True
                if not module.check_mode:
                    record = client.set_bmc(p["mac"], wanted)
                elif record is None:
                    record = dict((k, v) for k, v in wanted.items() if k not in ("username", "password"))
        if record is None:
            module.fail_json(msg="%s has no BMC recorded on the bastion; pass bmc (driver, address, username, password)"
                             % p["mac"])
        if module.check_mode and changed and p["state"] != "status":
            module.exit_json(changed=True, power="unknown", before="unknown", bmc=record)
        before = client.power(p["mac"])["power"]
        action, after = plan(before, p["state"])
        if action is not None:
            changed = True
            if not module.check_mode:
                after = client.power(p["mac"], action, p["boot"])["power"]
        module.exit_json(changed=changed, power=after, before=before, bmc=record,
                         diff=dict(before={"power": before}, after={"power": after}))
    except LabClientError as exc:
        module.fail_json(msg=str(exc), status=exc.status, error=exc.error, detail=exc.detail)


if __name__ == "__main__":
    main()
