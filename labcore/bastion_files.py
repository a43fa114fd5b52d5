"""The files a bastion serves from its data directory, by name: the iPXE binaries of its TFTP root
and the boot artefacts under ``images/``. The bastion puts them there (dnsmasq's generator,
``lab-bastion images ...``); ``labctl doctor`` checks that they are.
"""

from __future__ import annotations

from labcore.domain import OPERATING_SYSTEMS

#: TFTP file name -> file in Debian's ipxe package (/usr/lib/ipxe)
IPXE_FILES = {"undionly.kpxe": "undionly.kpxe", "snponly.efi": "snponly.efi", "ipxe.efi": "ipxe.efi"}
#: what firmware PXE gets: BIOS, UEFI x86-64
BIOS_FILE = "undionly.kpxe"
EFI_FILE = "snponly.efi"

#: images/<directory> -> the files in it: the discovery environment, each OS's installer kernel and
#: initrd, the UEFI local-boot GRUB that /dispatch chains for installed machines
BOOT_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "discovery": ("vmlinuz", "initrd.img"),
    **{o.name: (o.kernel, o.initrd) for o in OPERATING_SYSTEMS},
    "local-boot": ("grubx64.efi",),
}
