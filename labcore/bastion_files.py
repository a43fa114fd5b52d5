"""The files a bastion serves from its data directory, by name: the iPXE binaries of its TFTP root
and the boot artefacts under ``images/``. The bastion puts them there (dnsmasq's generator,
``lab-bastion images ...``); ``labctl doctor`` checks that they are.
"""

from __future__ import annotations

from labcore.domain import IMAGE_OS_NAMES, OPERATING_SYSTEMS

#: TFTP file name -> file in Debian's ipxe package (/usr/lib/ipxe)
IPXE_FILES = {"undionly.kpxe": "undionly.kpxe", "snponly.efi": "snponly.efi", "ipxe.efi": "ipxe.efi"}
#: what firmware PXE gets: BIOS, UEFI x86-64
BIOS_FILE = "undionly.kpxe"
EFI_FILE = "snponly.efi"

#: an image OS's files under images/<os>/ (lab-bastion images build-os)
ROOTFS = "rootfs.tar.zst"
ROOTFS_MANIFEST = "rootfs.json"

#: images/<directory> -> the files in it: the discovery environment, the installer environment of
#: the image deploy (the discovery kernel and initramfs plus the install tools), each OS's installer
#: kernel and initrd or root-filesystem image, the UEFI local-boot GRUB that /dispatch chains for
#: installed machines
BOOT_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "discovery": ("vmlinuz", "initrd.img"),
    "installer": ("vmlinuz", "initrd.img"),
    **{o.name: (ROOTFS, ROOTFS_MANIFEST) if o.installer == "image" else (o.kernel, o.initrd)
       for o in OPERATING_SYSTEMS},
    "local-boot": ("grubx64.efi",),
}


def artefact_command(name: str) -> str:
    """The command that puts the files of images/``name`` in place."""
    if name in ("discovery", "installer", "local-boot"):
        return f"lab-bastion images build-{name}"
    if name in IMAGE_OS_NAMES:
        return f"lab-bastion images build-os {name}"
    return f"lab-bastion images sync --os {name}"
