"""efi_bootnext's efibootmgr parser and network-entry choice, on efibootmgr outputs written in the
formats of efibootmgr 17 (no device paths without -v) and 18 (label<TAB>device path)."""

from __future__ import annotations

import importlib.util

from tests.support import REPO

spec = importlib.util.spec_from_file_location("efi_bootnext", REPO / "plugins/modules/efi_bootnext.py")
efi = importlib.util.module_from_spec(spec)
spec.loader.exec_module(efi)

# OVMF (QEMU), efibootmgr 18: label, a tab, then the device path.
OVMF_18 = """BootCurrent: 0004
Timeout: 0 seconds
BootOrder: 0004,0001,0002,0003,0000
Boot0000* UiApp\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)
Boot0001* UEFI QEMU DVD-ROM QM00003 \tPciRoot(0x0)/Pci(0x1,0x1)/Ata(1,0,0){auto_created_boot_option}
Boot0002* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0){auto_created_boot_option}
Boot0003* UEFI PXEv6 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,1)/IPv6([::]:<->[::]:,0,0){auto_created_boot_option}
Boot0004* Fedora\tHD(1,GPT,0b1e5a62-61f6-4c5c-9f6f-8f3bd0d2c83e,0x800,0x12c000)/File(\\EFI\\fedora\\shimx64.efi)
"""

# A Dell server, efibootmgr 17 without -v: labels only, an inactive NIC entry, BootNext set elsewhere.
DELL_17 = """BootCurrent: 0001
BootNext: 0001
Timeout: 2 seconds
BootOrder: 0001,0003,0004,0005
Boot0001* ubuntu
Boot0003  Integrated NIC 1 Port 1 Partition 1
Boot0004* NIC in Slot 3 Port 1 Partition 1
Boot0005* Embedded SATA Port Disk A
"""

# Two NICs with HTTP boot entries (Supermicro style, efibootmgr 18).
SUPERMICRO_18 = """BootCurrent: 0000
Timeout: 1 seconds
BootOrder: 0000,0007,0008,0009,000A
Boot0000* Fedora\tHD(1,GPT,aa,0x800,0x100000)/File(\\EFI\\fedora\\shimx64.efi)
Boot0007* UEFI HTTPv4 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x0)/MAC(3cecef000001,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)/Uri()
Boot0008* UEFI PXE IPv4 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x0)/MAC(3cecef000001,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)
Boot0009* UEFI PXE IPv4 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x1)/MAC(3cecef000002,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)
Boot000A* UEFI PXE IPv6 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x0)/MAC(3cecef000001,1)/IPv6([::]:<->[::]:,0,0)
"""

NO_NETWORK = """BootCurrent: 0000
BootOrder: 0000
Boot0000* debian\tHD(1,GPT,bb,0x800,0x100000)/File(\\EFI\\debian\\shimx64.efi)
"""


def test_parse_ovmf():
    info = efi.parse_efibootmgr(OVMF_18)
    assert info["boot_current"] == "0004" and info["boot_next"] is None
    assert info["boot_order"] == ["0004", "0001", "0002", "0003", "0000"]
    assert [e["num"] for e in info["entries"]] == ["0000", "0001", "0002", "0003", "0004"]
    pxe = info["entries"][2]
    assert pxe == {"num": "0002", "active": True, "label": "UEFI PXEv4 (MAC:525400123456)",
                   "path": "PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,1)/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0){auto_created_boot_option}"}
    assert efi.pick_network_entry(info["entries"])["num"] == "0002"  # IPv4 over IPv6; not the disk or DVD


def test_parse_dell_labels_only_prefers_active_entry():
    info = efi.parse_efibootmgr(DELL_17)
    assert info["boot_next"] == "0001"
    assert [(e["num"], e["active"]) for e in info["entries"]] == [("0001", True), ("0003", False), ("0004", True), ("0005", True)]
    assert all(e["path"] == "" for e in info["entries"])
    assert efi.pick_network_entry(info["entries"])["num"] == "0004"


def test_supermicro_prefers_pxe_over_http_and_the_given_mac():
    entries = efi.parse_efibootmgr(SUPERMICRO_18)["entries"]
    assert efi.pick_network_entry(entries)["num"] == "0008"
    assert efi.pick_network_entry(entries, mac="3C:EC:EF:00:00:02")["num"] == "0009"
    assert efi.pick_network_entry(entries, mac="3c-ec-ef-00-00-01")["num"] == "0008"


def test_explicit_entry_by_number_or_label():
    entries = efi.parse_efibootmgr(SUPERMICRO_18)["entries"]
    assert efi.pick_network_entry(entries, wanted="000a")["num"] == "000A"
    assert efi.pick_network_entry(entries, wanted="HTTPv4")["num"] == "0007"
    assert efi.pick_network_entry(entries, wanted="0042") is None


def test_no_network_entry():
    entries = efi.parse_efibootmgr(NO_NETWORK)["entries"]
    assert efi.pick_network_entry(entries) is None
    assert not efi.is_network(entries[0])


def test_junk_is_ignored():
    info = efi.parse_efibootmgr("EFI variables are not supported on this system.\n\nBootXYZ* nope\n")
    assert info == {"boot_current": None, "boot_next": None, "boot_order": [], "entries": []}


def test_an_ovmf_label_alone_is_a_network_entry():
    """Where efibootmgr prints no device paths (efibootmgr 17 without -v), OVMF's label
    "UEFI PXEv4 (MAC:...)" alone must be recognised as the network entry."""
    text = ("BootCurrent: 0004\nBootOrder: 0001,0004\nBoot0001* UEFI PXEv4 (MAC:525400E2D002)\n"
            "Boot0004* debian\n")
    entries = efi.parse_efibootmgr(text)["entries"]
    assert efi.pick_network_entry(entries, mac="52:54:00:e2:d0:02")["num"] == "0001"
    assert not efi.is_network(entries[1])
