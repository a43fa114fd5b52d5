"""Proxy-DHCP (the bastion's default): the LAN keeps its own DHCP server (a plain dnsmasq in a
"router" namespace joined to the lab's bridge), the bastion's dnsmasq only adds boot information.
A machine gets its address from the LAN server and its boot file from the bastion."""

from __future__ import annotations

import time

import pytest

from tests.e2e import lab as labmod
from tests.support import e2e_lab, e2e_prerequisites

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def proxy_lab(tmp_path_factory):
    e2e_prerequisites()
    with e2e_lab(tmp_path_factory.mktemp("proxylab"), "proxy lab up (netns, LAN DHCP router, bastion proxy-DHCP)",
                 dhcp_mode="proxy") as the_lab:
        yield the_lab


def test_bios_machine_gets_address_from_lan_and_boot_file_from_bastion(proxy_lab):
    lab = proxy_lab
    m = lab.machine("proxy-bios")
    try:
        wanted = "/dispatch?mac=" + m.mac.replace(":", "%3A")
        deadline = time.monotonic() + 60
        while not lab.access_lines(wanted) and time.monotonic() < deadline:
            # iPXE gave up on the network (no boot file): no point waiting for the timeout
            assert "Nothing to boot" not in m.console_text(), m.console_text()[-1500:]
            time.sleep(0.5)
        line = lab.wait_access(wanted, 1, m)
        client_ip = line.split()[0]
        last = int(client_ip.rsplit(".", 1)[1])
        assert client_ip.startswith(labmod.SUBNET + ".") and 50 <= last <= 90, line  # the LAN server's range
        leases = (lab.root / "lan-dhcp.leases").read_text()
        assert m.mac in leases and client_ip in leases
        # the bastion handed out no address: its own lease file has no entry for the machine
        bastion_leases = lab.data / "run" / "dnsmasq.leases"
        assert not bastion_leases.exists() or m.mac not in bastion_leases.read_text()
        assert "proxy" in (lab.data / "run" / "dnsmasq.conf").read_text()
    finally:
        lab.stop_machine(m)
