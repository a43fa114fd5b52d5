"""Build the installer environment of the image deploy: the discovery image plus the install tools.

``lab-bastion images build-installer`` (also run by ``build-os``) publishes ``<data>/images/installer/``:

- ``vmlinuz``: the discovery kernel (the same file);
- ``initrd.img``: the discovery initramfs with one more gzip'd cpio archive appended (the kernel
  unpacks concatenated archives in order, later files replacing earlier ones). The added layer has
  ``etc/lab/installer.sh`` (sourced by the discovery ``/init`` when the kernel command line has
  ``lab.script=``), ``etc/lvm/lvm.conf`` (LVM without udev), the storage and filesystem modules
  of :data:`MODULES` with their dependencies, and the install tools of :data:`TOOLS` copied from
  this host under ``/opt/lab/bin`` with every shared library ``ldd`` names at its own path;
- ``manifest.json``: sizes, sha256, the tools and modules, the inputs hash.

The tools come from the bastion host (a Debian system; ``scripts/apt-packages.txt`` installs
them): one ``ldd`` per tool finds its libraries. The inputs hash covers the discovery image's
hash, every copied file's content, the modules and this directory's files, so a host package
update or a new discovery image makes a new installer and nothing else does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bastion_app.images import discovery as disc

BUILD_FORMAT = 1
SOURCE_DIR = Path(__file__).with_name("installer")

#: Modules the installer loads besides the discovery image's drivers, in this order: crc32c without
#: CPU acceleration first (libcrc32c, which XFS needs, asks the crypto API for it when it loads; an
#: emulated CPU may have no SSE4.2), device-mapper (LVM), the filesystems of the layout, the FAT
#: code pages, efivarfs (UEFI boot entries).
MODULES: tuple[str, ...] = ("crc32c_generic", "dm_mod", "xfs", "ext4", "vfat", "nls_cp437", "nls_ascii",
                            "efivarfs")

#: Install tools (name on this host's PATH -> its name under /opt/lab/bin). ``chroot`` too:
#: busybox's runs its own applet when the command has an applet's name (``passwd``, ``chown``),
#: not the target system's program.
TOOLS: tuple[str, ...] = ("bash", "lsblk", "blkid", "wipefs", "sfdisk", "blockdev", "lvm", "mkfs.xfs",
                          "mke2fs", "mkfs.fat", "mkswap", "curl", "zstd", "tar", "efibootmgr", "mount",
                          "umount", "findmnt", "sha256sum", "chroot", "install")
#: Host files the tools read (copied to the same path).
TOOL_FILES: tuple[str, ...] = ("/etc/mke2fs.conf",)


class InstallerBuildError(RuntimeError):
    """The installer environment could not be built; the message says what to do."""


def _source_files() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.is_file())


def _layer_files() -> dict[str, Path]:
    """Archive path -> host file: the tools, their libraries (at their own paths), TOOL_FILES."""
    try:
        files = disc.host_tool_files(TOOLS)
    except disc.DiscoveryBuildError as exc:
        raise InstallerBuildError(str(exc)) from exc
    for extra in TOOL_FILES:
        if Path(extra).is_file():
            files[extra.lstrip("/")] = Path(extra)
    return files


def inputs_hash(discovery_hash: str, files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\ndiscovery={discovery_hash}\nmodules={','.join(MODULES)}\n".encode())
    for name in sorted(files):
        h.update(f"{name}\n".encode())
        h.update(hashlib.sha256(files[name].resolve().read_bytes()).digest())
    for path in _source_files():
        h.update(f"src={path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _layer(kver: str, mods: disc.ModuleSet, files: dict[str, Path]) -> bytes:
    raw = io.BytesIO()
    cpio = disc.CpioWriter(raw)
    dirs = {"etc", "etc/lab", "etc/lvm", "opt", "opt/lab", "opt/lab/bin", "lib", "lib/modules", f"lib/modules/{kver}",
            "run", "target"}
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    # usr/lib etc. exist in the discovery archive too; a directory entry again is harmless for the
    # kernel (it keeps the directory), but the writer refuses duplicates within one archive
    for d in sorted(dirs):
        cpio.dir(d)
    cpio.file("etc/lab/installer.sh", (SOURCE_DIR / "installer.sh").read_bytes(), 0o644)
    cpio.file("etc/lvm/lvm.conf", (SOURCE_DIR / "lvm.conf").read_bytes(), 0o644)
    for name in mods.order:
        cpio.file(f"lib/modules/{kver}/{name}.ko", disc._module_bytes(mods.files[name]))
    cpio.file("etc/lab/installer.modules", ("\n".join(mods.order) + "\n").encode())
    for name, path in sorted(files.items()):
        cpio.file(name, path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
    cpio.close()
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def build_installer(images_dir: Path, *, cache_dir: Path | None = None,
                    progress: Callable[[str], object] = print, force: bool = False) -> dict:
    """Build (or take from the cache) the installer environment and publish it in
    ``<images_dir>/installer``; builds the discovery image first when needed. Returns its manifest."""
    images = Path(images_dir)
    cache = Path(cache_dir) if cache_dir is not None else disc.default_cache_dir().with_name("installer")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        img = disc.build_discovery(None, images / "discovery", progress=progress)
    except disc.DiscoveryBuildError as exc:
        raise InstallerBuildError(f"the discovery image (the installer's base): {exc}") from None
    dmanifest = json.loads(img.manifest.read_text())
    files = _layer_files()
    digest = inputs_hash(img.inputs_hash, files)
    final = cache / digest
    out = images / "installer"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if force or not (final / "manifest.json").is_file():
        kpkg = dmanifest["packages"]["kernel"]
        debs = disc.default_cache_dir() / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{digest}-"))
        try:
            deb = disc._download(kpkg["name"], kpkg["version"], debs, progress)
            progress(f"installer: modules {', '.join(MODULES)} from {deb.name}")
            disc._extract(deb, work / "kernel")
            kver = dmanifest["kernel_version"]
            moddir = next((work / "kernel" / b / kver for b in ("lib/modules", "usr/lib/modules")
                           if (work / "kernel" / b / kver).is_dir()), None)
            if moddir is None:
                raise InstallerBuildError(f"{deb.name} has no modules for {kver}")
            mods = disc.resolve_modules(moddir, MODULES)
            progress(f"installer: {len(TOOLS)} tools, {len(files)} files with their libraries")
            layer = _layer(kver, mods, files)
            base = img.initrd.read_bytes()
            combined = base + b"\0" * (-len(base) % 4) + layer
            (work / "initrd.img").write_bytes(combined)
            shutil.copyfile(img.kernel, work / "vmlinuz")
            manifest = {
                "format": BUILD_FORMAT, "inputs_hash": digest, "discovery_hash": img.inputs_hash,
                "kernel_version": kver, "tools": list(TOOLS), "modules": mods.order,
                "layer_bytes": len(layer), "discovery_initrd_bytes": len(base),
                "files": {n: {"size_bytes": (work / n).stat().st_size,
                              "sha256": hashlib.sha256((work / n).read_bytes()).hexdigest()}
                          for n in ("vmlinuz", "initrd.img")},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            manifest["size_bytes"] = sum(f["size_bytes"] for f in manifest["files"].values())
            shutil.rmtree(work / "kernel")
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in cache.iterdir():
            if old.is_dir() and old != final and re.fullmatch(r"[0-9a-f]{16}", old.name):
                shutil.rmtree(old, ignore_errors=True)
        cached = False
    else:
        cached = True
    manifest = json.loads((final / "manifest.json").read_text())
    for name in ("vmlinuz", "initrd.img", "manifest.json"):
        disc.publish(final / name, out / name)
    progress(f"installer: {out}/vmlinuz + initrd.img, {manifest['size_bytes'] / 1e6:.1f} MB "
             f"(install tools layer {manifest['layer_bytes'] / 1e6:.1f} MB), hash {digest}"
             f"{' (cached)' if cached else ''}, {time.monotonic() - started:.1f} s")
    return {**manifest, "cached": cached}
