"""Which address speaks for a machine: the one home of "is this request from that MAC?".

An install token alone is not enough (anyone who reads the install script has it), so the bastion
also checks where a request comes from. What it knows about a source address, strongest first:

1. **DHCP lease** (full DHCP, ``dhcp_mode: full``): the bastion's own dnsmasq leased the address to
   a MAC (``<data>/run/dnsmasq.leases``). An address leased to the machine is the machine; an
   address leased to another MAC is not; and once the machine holds a lease, no unleased address
   speaks for it.
2. **Neighbour table** (machines on the provisioning segment, either DHCP mode): the kernel's ARP
   entry for the source address (``/proc/net/arp``) names the MAC that answered for it a moment
   ago (the TCP handshake needs it). In proxy-DHCP mode dnsmasq hands out no address and keeps no
   lease, so this is how the bastion learns the address of the machine that PXE-booted.
3. **First address** (neither: DHCP elsewhere and the machine beyond a router): the first address
   that fetched the install script is bound to the install (``machines.install_ip``), and every
   other one is refused until the install ends or is queued again.

Which of them a bastion's configuration gives is :func:`labcore.bastion_config.install_binding`
(``labctl doctor`` shows it). ARP spoofing and a rogue DHCP server defeat 1 and 2; they are
outside what the bastion can see (docs/reliability.md, threat model).
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path

from labcore import validate

#: the kernel's IPv4 neighbour (ARP) table; dnsmasq hands out IPv4 addresses only
ARP_TABLE = Path("/proc/net/arp")
#: /proc/net/arp flags: ATF_COM, the entry is complete
_ATF_COM = 0x2


class Claim(StrEnum):
    VERIFIED = "verified"  # a lease or the neighbour table says the address is the machine's
    REFUSED = "refused"  # a lease or the neighbour table says it is someone else's
    UNKNOWN = "unknown"  # neither knows: the first-address rule decides


def leases_path(cfg) -> Path:
    """Where the bastion's dnsmasq writes its DHCP leases (the dnsmasq child's --dhcp-leasefile)."""
    return cfg.run_path / "dnsmasq.leases"


def read_leases(path: Path, now: float | None = None) -> dict[str, str]:
    """ip -> mac of the unexpired leases in a dnsmasq lease file (``expiry mac ip hostname
    client-id`` per line; expiry 0 is an infinite lease)."""
    now = time.time() if now is None else now
    out: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0].isdigit() and (int(f[0]) == 0 or int(f[0]) > now):
            try:
                out[f[2]] = validate.mac(f[1])
            except validate.ValidationError:
                continue
    return out


def read_neighbours(path: Path | None = None) -> dict[str, str]:
    """ip -> mac of the complete entries of the kernel's ARP table (default ARP_TABLE)."""
    out: dict[str, str] = {}
    try:
        lines = (path or ARP_TABLE).read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()  # IP address, HW type, Flags, HW address, Mask, Device
        try:
            if len(f) >= 4 and int(f[2], 16) & _ATF_COM:
                out[f[0]] = validate.mac(f[3])
        except (ValueError, validate.ValidationError):
            continue
    return out


def claim(leases: Path, mac: str, ip: str | None) -> tuple[Claim, str]:
    """What the lease file and the neighbour table say about ``ip`` speaking for ``mac``, and
    which of them said it ("dhcp lease", "neighbour table", "first address")."""
    if not ip:
        return Claim.UNKNOWN, "first address"
    leased = read_leases(leases)
    if ip in leased:
        return (Claim.VERIFIED if leased[ip] == mac else Claim.REFUSED), "dhcp lease"
    if mac in leased.values():
        return Claim.REFUSED, "dhcp lease"
    holder = read_neighbours().get(ip)
    if holder:
        return (Claim.VERIFIED if holder == mac else Claim.REFUSED), "neighbour table"
    return Claim.UNKNOWN, "first address"


def accepts(verdict: Claim, bound: str | None, ip: str | None) -> bool:
    """Whether a request from ``ip`` speaks for a machine whose bound address is ``bound``."""
    if verdict == Claim.UNKNOWN:
        return bound is None or bound == ip
    return verdict == Claim.VERIFIED

