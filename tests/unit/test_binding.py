"""bastion_app.binding: which source address speaks for a machine (issue 15, finding 1)."""

from __future__ import annotations

import time

import pytest

from bastion_app import binding
from bastion_app.binding import Claim, accepts, claim
from labcore import bastion_config

MAC, OTHER = "52:54:00:15:00:01", "52:54:00:15:00:02"
ARP = """IP address       HW type     Flags       HW address            Mask     Device
10.0.0.7         0x1         0x2         52:54:00:15:00:01     *        br0
10.0.0.8         0x1         0x2         52:54:00:15:00:02     *        br0
10.0.0.9         0x1         0x0         52:54:00:15:00:01     *        br0
"""


@pytest.fixture
def tables(tmp_path, monkeypatch):
    arp = tmp_path / "arp"
    arp.write_text(ARP)
    monkeypatch.setattr(binding, "ARP_TABLE", arp)
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text("")
    return leases


def test_a_lease_decides(tables):
    tables.write_text(f"{int(time.time()) + 600} {MAC} 10.0.0.5 node *\n{int(time.time()) - 1} {OTHER} 10.0.0.6 * *\n")
    assert claim(tables, MAC, "10.0.0.5") == (Claim.VERIFIED, "dhcp lease")
    assert claim(tables, OTHER, "10.0.0.5") == (Claim.REFUSED, "dhcp lease")
    # the machine holds a lease: no other address speaks for it, not even its own ARP entry
    assert claim(tables, MAC, "10.0.0.7") == (Claim.REFUSED, "dhcp lease")
    # an expired lease says nothing
    assert claim(tables, OTHER, "10.0.0.6") == (Claim.UNKNOWN, "first address")


def test_the_neighbour_table_decides_without_a_lease(tables):
    assert claim(tables, MAC, "10.0.0.7") == (Claim.VERIFIED, "neighbour table")
    assert claim(tables, MAC, "10.0.0.8") == (Claim.REFUSED, "neighbour table")
    assert claim(tables, MAC, "10.0.0.9") == (Claim.UNKNOWN, "first address"), "an incomplete entry says nothing"
    assert claim(tables, MAC, None) == (Claim.UNKNOWN, "first address")


def test_the_first_address_binds():
    assert accepts(Claim.UNKNOWN, None, "10.0.0.5") and accepts(Claim.UNKNOWN, "10.0.0.5", "10.0.0.5")
    assert not accepts(Claim.UNKNOWN, "10.0.0.5", "10.0.0.6")
    assert accepts(Claim.VERIFIED, "10.0.0.5", "10.0.0.6") and not accepts(Claim.REFUSED, None, "10.0.0.6")


@pytest.mark.parametrize(("values", "name"), [
    ({"dhcp_mode": "full", "dhcp_range": "10.0.0.100,10.0.0.199"}, "dhcp lease"),
    ({}, "neighbour table"),
    ({"dnsmasq": False}, "first address"),
])
def test_the_configuration_says_which_binding_holds(tmp_path, values, name):
    cfg = bastion_config.build({"data_dir": str(tmp_path), **values})
    assert bastion_config.install_binding(cfg)[0] == name
