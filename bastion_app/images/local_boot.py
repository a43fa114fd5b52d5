"""The UEFI local-boot loader: a standalone GRUB EFI image (Debian's grub-efi-amd64-bin, built with
grub-mkstandalone) whose embedded config searches the local disks for the installed system's EFI
loader and chainloads it.

Why: an installed UEFI machine that PXE-boots is told by ``/dispatch`` to boot from its disk. A bare
iPXE ``exit`` hands control back to the firmware, and some firmware then stops in its boot manager
instead of trying the next entry. So ``/dispatch`` chains ``/images/local-boot/grubx64.efi`` (this
image) when it exists, and ``exit`` is only the fallback.

Output: ``<data>/images/local-boot/grubx64.efi`` (``lab-bastion images build-local-boot``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from labcore import domain

GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")

#: Loaders tried in order: a distribution's shim or GRUB first (what its NVRAM entry would
#: boot), then the removable-media fallback path every UEFI installer writes. A reinstall removes
#: the other systems' folders (scripts/_bootorder.sh.j2), so the first loader found is the
#: installed system's.
LOADERS: tuple[str, ...] = (
    *(f"/EFI/{d}/{f}" for d in domain.EFI_LOADER_DIRS for f in ("shimx64.efi", "grubx64.efi")),
    "/EFI/BOOT/BOOTX64.EFI",
)

#: GRUB modules the local-boot config needs (put in the image and loaded at start).
MODULES: tuple[str, ...] = ("part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_file",
                            "chain", "echo", "sleep", "test", "reboot")


class LocalBootBuildError(RuntimeError):
    pass


def config_text(loaders: Iterable[str] = LOADERS) -> str:
    """The embedded grub.cfg: search every local disk for each loader, chainload the first found."""
    for path in loaders:
        if not path.startswith("/EFI/") or not all(c.isalnum() or c in "/._-" for c in path):
            raise ValueError(f"not an EFI loader path: {path!r}")
    lines = [
        "# lab-platform local boot: find the installed system's EFI loader on a local disk",
        "set timeout=0",
        'echo "lab-platform: local boot, searching the local disks for an EFI loader"',
        f"for loader in {' '.join(loaders)}; do",
        '  if search --no-floppy --file --set=root "$loader"; then',
        '    echo "lab-platform: chainloading ($root)$loader"',
        '    chainloader "$loader"',
        "    boot",
        "  fi",
        "done",
        'echo "lab-platform: no EFI loader found on any local disk; returning to the firmware"',
        "sleep 5",
        "exit",
        "",
    ]
    return "\n".join(lines)


def grub_standalone(out: Path, cfg: Path, modules: Iterable[str] = MODULES) -> Path:
    """Build a standalone x86_64-efi GRUB at ``out`` with ``cfg`` as its embedded grub.cfg and only
    ``modules`` (and what they depend on) inside."""
    tool = shutil.which("grub-mkstandalone")
    if not tool or not (GRUB_EFI_DIR / "modinfo.sh").exists():
        raise LocalBootBuildError("needs grub-mkstandalone and Debian's grub-efi-amd64-bin "
                                  "(apt-get install grub-common grub-efi-amd64-bin; make deps-system)")
    mods = " ".join(modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [tool, "-O", "x86_64-efi", "-o", str(tmp), f"--modules={mods}", f"--install-modules={mods}",
           "--locales=", "--fonts=", "--themes=", "--compress=xz", f"boot/grub/grub.cfg={cfg}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LocalBootBuildError(f"grub-mkstandalone failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def build_local_boot(out_dir: Path, *, progress: Callable[[str], object] = print) -> Path:
    """Build ``<out_dir>/grubx64.efi`` (out_dir: the bastion's ``images/local-boot``)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lab-local-boot-") as tmp:
        cfg = Path(tmp) / "grub.cfg"
        cfg.write_text(config_text())
        out = grub_standalone(out_dir / "grubx64.efi", cfg)
    progress(f"local-boot: {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return out
