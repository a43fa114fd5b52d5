"""The image deploy's build side: the installer environment (discovery image + install tools layer)
built for real and every install tool run from the unpacked initramfs in a chroot (so a missing
shared library shows here, not on a machine), and the OS image builder's inputs and refusals.

The OS image itself (debootstrap, minutes) is built by the e2e lab (tests/e2e/lab.py
prepare_images) and deployed there; this module does not build it."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from bastion_app.images import installer, osimage
from tests.support import need_binary, need_root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need_root()
    need_binary("apt-get", "dpkg-deb", "cpio", "ldd", *installer.TOOLS)
    images = tmp_path_factory.mktemp("images")
    manifest = installer.build_installer(images, progress=lambda msg: None)
    return images, manifest


def _unpack(initrd: Path, dest: Path) -> None:
    """Both archives of the combined initramfs (gzip members with zero padding between them, as the
    kernel reads them), the second over the first."""
    data = initrd.read_bytes()
    members = []
    while data:
        data = data.lstrip(b"\0")
        if not data:
            break
        d = zlib.decompressobj(31)
        members.append(d.decompress(data))
        data = d.unused_data
    assert len(members) == 2, f"expected the discovery archive and the installer layer, got {len(members)}"
    dest.mkdir()
    for raw in members:
        proc = subprocess.run(["cpio", "-idmu", "--quiet", "--no-absolute-filenames"], input=raw, cwd=dest,
                              capture_output=True)
        assert proc.returncode == 0, proc.stderr


def test_layer_has_the_installer_parts(built):
    images, manifest = built
    out = images / "installer"
    assert (out / "vmlinuz").read_bytes() == (images / "discovery" / "vmlinuz").read_bytes()
    base = (images / "discovery" / "initrd.img").read_bytes()
    combined = (out / "initrd.img").read_bytes()
    assert combined.startswith(base), "the installer initramfs starts with the discovery archive"
    assert manifest["layer_bytes"] == len(combined) - len(base) - (-len(base) % 4)
    layer = gzip.decompress(combined[len(base):].lstrip(b"\0"))
    for name in (b"etc/lab/installer.sh", b"etc/lvm/lvm.conf", b"etc/lab/installer.modules", b"opt/lab/bin/lvm",
                 b"opt/lab/bin/mkfs.xfs", b"lib64/ld-linux-x86-64.so.2"):
        assert name + b"\0" in layer, name
    for module in ("dm_mod", "xfs", "ext4", "vfat", "efivarfs", "crc32c_generic"):
        assert module in manifest["modules"], manifest["modules"]


def test_every_install_tool_runs_from_the_initramfs(built, tmp_path):
    images, _ = built
    root = tmp_path / "root"
    _unpack(images / "installer" / "initrd.img", root)
    checks = {
        "bash": "--version", "lsblk": "--version", "blkid": "-V", "wipefs": "--version", "sfdisk": "--version",
        "blockdev": "--version", "lvm": "version", "mkfs.xfs": "-V", "mke2fs": "-V", "mkfs.fat": "--help",
        "mkswap": "--version", "curl": "--version", "zstd": "--version", "tar": "--version",
        "efibootmgr": "--version", "mount": "--version", "umount": "--version", "findmnt": "--version",
        "sha256sum": "--version", "chroot": "--version", "install": "--version",
    }
    assert set(checks) == set(installer.TOOLS)
    failed = {}
    for tool, arg in checks.items():
        proc = subprocess.run([shutil.which("chroot"), str(root), f"/opt/lab/bin/{tool}", arg], capture_output=True, text=True,
                              env={"PATH": "/opt/lab/bin:/bin", "LVM_SUPPRESS_FD_WARNINGS": "1"})
        if "error while loading shared libraries" in proc.stderr or proc.returncode not in (0, 1):
            failed[tool] = (proc.returncode, proc.stderr.strip()[-300:])
    assert not failed, failed
    # the discovery /init runs the installer when lab.script= is given
    init = (root / "init").read_text()
    assert "lab.script=*" in init and ". /etc/lab/installer.sh" in init


def test_second_build_is_cached(built):
    images, manifest = built
    again = installer.build_installer(images, progress=lambda msg: None)
    assert again["cached"] and again["inputs_hash"] == manifest["inputs_hash"]


def test_os_image_inputs_and_refusals(monkeypatch):
    a = osimage.inputs_hash("debian-12", "bookworm", "http://deb.debian.org/debian")
    assert a == osimage.inputs_hash("debian-12", "bookworm", "http://deb.debian.org/debian")
    assert a != osimage.inputs_hash("debian-12", "bookworm", "http://mirror.example/debian")
    monkeypatch.setattr(osimage, "PACKAGES", (*osimage.PACKAGES, "vim-tiny"))
    assert a != osimage.inputs_hash("debian-12", "bookworm", "http://deb.debian.org/debian")
    with pytest.raises(osimage.OsImageError, match="not an image-deployed OS"):
        osimage.image_os("fedora-43")
    with pytest.raises(osimage.OsImageError, match="debian-12, debian-13"):
        osimage.image_os("nope")
    assert osimage.security_mirror("http://deb.debian.org/debian") == "http://deb.debian.org/debian-security"
    assert "bookworm-security main" in osimage.sources_list("bookworm", "http://deb.debian.org/debian")
    for pkg in ("grub-pc-bin", "grub-efi-amd64-bin", "grub2-common", "lvm2", "xfsprogs", "efibootmgr",
                "openssh-server", "sudo", "python3", "chrony", "curl"):
        assert pkg in osimage.PACKAGES
    assert "grub-pc" not in osimage.PACKAGES and "grub-efi-amd64" not in osimage.PACKAGES  # they conflict
