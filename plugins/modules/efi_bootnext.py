#!/usr/bin/python
# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
module: efi_bootnext
short_description: Make a UEFI host network-boot (PXE) once, at its next boot
version_added: 0.1.0
description:
  - Reads the UEFI boot entries with C(efibootmgr), finds the network (PXE) entry and sets C(BootNext)
    to it, so that the next boot (only) goes to the bastion. The boot order is not changed.
  - On a host without UEFI (no C(/sys/firmware/efi)) it changes nothing and returns RV(firmware=bios).
    A BIOS host that should PXE-boot needs the network first in its boot order.
  - The network entry is the one whose label or device path names PXE, a network, IPv4/IPv6 or a
    C(MAC(...)) node; IPv4 is preferred over IPv6, active entries over inactive ones, and an entry
    whose MAC matches O(mac) over all others. O(entry) picks one explicitly.
author:
  - lab-platform maintainers (@lab-platform)
requirements:
  - efibootmgr (on UEFI hosts)
extends_documentation_fragment:
  - lab.platform.attributes
options:
  entry:
    description:
      - Boot entry to use, as its four hex digits (C(0003)) or a regular expression matched against
        the entry's label. Default is the best network entry.
    type: str
  mac:
    description: Prefer the network entry of this interface (a MAC address in any common form).
    type: str
"""

EXAMPLES = r"""
- name: Network-boot once at the next boot (no change on BIOS hosts)
  lab.platform.efi_bootnext: {}
  register: bootnext

- name: Network-boot through a given interface
  lab.platform.efi_bootnext:
    mac: "{{ ansible_default_ipv4.macaddress }}"
"""

RETURN = r"""
firmware:
  description: C(uefi) or C(bios).
  returned: always
  type: str
  sample: uefi
boot_next:
  description: The BootNext entry after the run (four hex digits), or null.
  returned: always
  type: str
  sample: "0003"
entry:
  description: The chosen network entry.
  returned: when firmware is uefi
  type: dict
  sample:
    num: "0003"
    label: UEFI PXEv4 (MAC:525400123456)
    active: true
    path: PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)
entries:
  description: Every boot entry efibootmgr listed.
  returned: when firmware is uefi
  type: list
  elements: dict
"""

import os
import re

from ansible.module_utils.basic import AnsibleModule

EFI_DIR = "/sys/firmware/efi"
_BOOT = re.compile(r"^Boot([0-9A-Fa-f]{4})(\*?)\s+(.*)$")
_NETWORK = re.compile(r"\b(PXE(v[46])?|network|net boot|netboot|IPv4|IPv6|NIC|LAN|iPXE|Ethernet)\b|MAC[(:][0-9A-F]{12}",
                      re.IGNORECASE)
_MACNODE = re.compile(r"MAC[:(]([0-9A-Fa-f]{12})")


def parse_efibootmgr(text):
    """Parse `efibootmgr` (or `efibootmgr -v`) output.

    Returns {"boot_current", "boot_next", "boot_order": [...], "entries": [{num, active, label, path}]}.
    Labels and device paths are separated by a tab (efibootmgr 17 and 18); older output without a tab
    has no path."""
    info = {"boot_current": None, "boot_next": None, "boot_order": [], "entries": []}
    for line in text.splitlines():
        line = line.rstrip("\r\n")
        if line.startswith("BootCurrent:"):
            info["boot_current"] = line.split(":", 1)[1].strip().upper() or None
        elif line.startswith("BootNext:"):
            info["boot_next"] = line.split(":", 1)[1].strip().upper() or None
        elif line.startswith("BootOrder:"):
            info["boot_order"] = [x.strip().upper() for x in line.split(":", 1)[1].split(",") if x.strip()]
        else:
            m = _BOOT.match(line)
            if m:
                rest = m.group(3)
                label, _tab, path = rest.partition("\t")
                info["entries"].append({"num": m.group(1).upper(), "active": m.group(2) == "*",
                                        "label": label.strip(), "path": path.strip()})
    return info


def _norm_mac(mac):
    return re.sub(r"[^0-9a-f]", "", (mac or "").lower())


def is_network(entry):
    return bool(_NETWORK.search(entry["label"]) or _NETWORK.search(entry["path"]))


def pick_network_entry(entries, wanted=None, mac=None):
    """The entry to boot from the network, or None. `wanted` = 4 hex digits or a label regex."""
    if wanted:
        if re.fullmatch(r"[0-9A-Fa-f]{4}", wanted):
            return next((e for e in entries if e["num"] == wanted.upper()), None)
        rx = re.compile(wanted, re.IGNORECASE)
        return next((e for e in entries if rx.search(e["label"])), None)
    mac = _norm_mac(mac)

    def score(e):
        text = e["label"] + " " + e["path"]
        macs = [m.lower() for m in _MACNODE.findall(text)]
        v6 = re.search(r"IPv6", text, re.IGNORECASE) is not None
        v4 = re.search(r"IPv4|PXEv4", text, re.IGNORECASE) is not None
        http = re.search(r"\bHTTP\b|Uri\(", text, re.IGNORECASE) is not None
        return (bool(mac) and mac in macs, e["active"], v4 or not v6, not http)

    candidates = [e for e in entries if is_network(e)]
    if not candidates:
        return None
    # max() keeps the first of equal scores: efibootmgr lists entries in number order.
    return max(candidates, key=score)


def main():
    module = AnsibleModule(
        argument_spec=dict(entry=dict(type="str"), mac=dict(type="str")),
        supports_check_mode=True,
    )
    if not os.path.isdir(EFI_DIR):
        module.exit_json(changed=False, firmware="bios", boot_next=None,
                         msg="no UEFI firmware (%s is missing): nothing to set" % EFI_DIR)
    efibootmgr = module.get_bin_path("efibootmgr", required=True)
    # -v: the device paths too (efibootmgr 17 prints them only then; OVMF's labels alone say "PXEv4")
    rc, out, err = module.run_command([efibootmgr, "-v"], check_rc=False)
    if rc != 0:
        module.fail_json(msg="efibootmgr failed: %s" % (err or out).strip(), rc=rc)
    info = parse_efibootmgr(out)
    entry = pick_network_entry(info["entries"], module.params["entry"], module.params["mac"])
    if entry is None:
        module.fail_json(msg="no network (PXE) boot entry found; enable network boot in the firmware setup",
                         entries=info["entries"])
    result = dict(firmware="uefi", entry=entry, entries=info["entries"], boot_next=info["boot_next"],
                  diff=dict(before="BootNext: %s\n" % info["boot_next"], after="BootNext: %s\n" % entry["num"]))
    if info["boot_next"] == entry["num"]:
        module.exit_json(changed=False, **result)
    result["boot_next"] = entry["num"]
    if not module.check_mode:
        module.run_command([efibootmgr, "--bootnext", entry["num"]], check_rc=True)
    module.exit_json(changed=True, **result)


if __name__ == "__main__":
    main()
