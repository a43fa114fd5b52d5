"""`labctl provision makeiso`: a hybrid boot ISO (BIOS + UEFI, CD or USB stick) holding Debian's
iPXE, which asks the bastion's /dispatch what to do, for machines that cannot PXE-boot.

Debian's iPXE (package ``ipxe``, 1.0.0+git-20190125) has no embedded script and cannot be given
one on its EFI command line, so:

- BIOS: a GRUB El Torito image (grub-pc-bin) loads ``ipxe.lkrn`` with the script as its initrd,
  which iPXE runs (``linux16`` / ``initrd16``).
- UEFI: the El Torito EFI image (FAT, built with mtools) holds ``ipxe.efi`` as
  ``EFI/BOOT/BOOTX64.EFI`` and the script as ``autoexec.ipxe`` (root and EFI/BOOT). iPXE 1.21 and
  later runs it; Debian's 2019 build does not know autoexec.ipxe and autoboots by DHCP instead,
  which reaches /dispatch when the bastion's DHCP/proxy-DHCP answers on that network (it hands
  iPXE clients the /dispatch URL). ``--ipxe-dir`` takes a newer iPXE build.

The image is assembled with xorriso (GRUB's hybrid MBR, a GPT EFI partition) and checked with
xorriso's own El Torito report before labctl says it is done.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import click

from labcore.templating import environment
from labctl import config, errors, output
from labctl.context import Ctx, output_option, pass_ctx

TEMPLATES = Path(__file__).parent / "templates" / "makeiso"
IPXE_DIR = Path("/usr/lib/ipxe")
GRUB_PC = Path("/usr/lib/grub/i386-pc")
MARKER = "/lab/boot.ipxe"
#: GRUB modules in the BIOS El Torito core image (their dependencies come along)
GRUB_MODULES = ("biosdisk", "iso9660", "part_msdos", "part_gpt", "search", "search_fs_file", "linux16", "echo", "boot")
VOLUME_ID = "LAB_IPXE"


def render(name: str, **ctx) -> str:
    """Our templates, rendered with the Jinja environment the bastion's boot scripts use (its
    `ipxe` filter refuses a value that could end an iPXE line)."""
    return environment(TEMPLATES).get_template(name).render(**ctx)


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise errors.LabctlError(f"{cmd[0]} is not installed (needed to {what})",
                                 "apt-get install xorriso mtools grub-pc-bin ipxe (make deps-system)") from None
    if proc.returncode != 0:
        raise errors.LabctlError(f"{cmd[0]} failed to {what} (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return proc.stdout + proc.stderr


def efi_image(out: Path, files: dict[str, Path]) -> Path:
    """A FAT image (mtools) holding ``files`` (image path -> local file)."""
    size = sum(p.stat().st_size for p in files.values()) + 512 * 1024
    sectors = max(2880, math.ceil(size / 512 / 2048) * 2048)
    with open(out, "wb") as f:
        f.truncate(sectors * 512)
    _run(["mformat", "-i", str(out), "-v", VOLUME_ID[:11], "::"], "format the EFI image")
    made: set[str] = set()
    for dest, src in files.items():
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                _run(["mmd", "-i", str(out), f"::/{d}"], "make a directory in the EFI image")
                made.add(d)
        _run(["mcopy", "-i", str(out), str(src), f"::/{dest.strip('/')}"], "copy into the EFI image")
    return out


def el_torito_report(iso: Path) -> str:
    return _run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], "read the ISO's boot catalogue")


def boot_platforms(report: str) -> set[str]:
    """Platforms of the boot entries in xorriso's El Torito report: {'BIOS', 'UEFI'}."""
    return {m.group(1) for m in re.finditer(r"^El Torito boot img\s*:\s*\d+\s+(BIOS|UEFI)\b", report, re.M)}


def build_iso(out: Path, base_url: str, ipxe_dir: Path = IPXE_DIR) -> str:
    """Build the hybrid ISO at ``out``; returns xorriso's El Torito report of the result."""
    base_url = config.check_value("bastionUrl", base_url)
    if not base_url:
        raise errors.UsageError("no bastion URL", "pass --bastion URL or set bastionUrl")
    lkrn, efi = ipxe_dir / "ipxe.lkrn", ipxe_dir / "ipxe.efi"
    for f in (lkrn, efi, GRUB_PC / "boot_hybrid.img"):
        if not f.exists():
            raise errors.LabctlError(f"{f} is missing", "apt-get install ipxe grub-pc-bin (make deps-system)")
    script = render("boot.ipxe.j2", base=base_url)
    with tempfile.TemporaryDirectory(prefix="labctl-iso-") as tmp:
        t = Path(tmp)
        tree = t / "tree"
        (tree / "lab").mkdir(parents=True)
        (tree / "boot/grub").mkdir(parents=True)
        shutil.copyfile(lkrn, tree / "lab/ipxe.lkrn")
        (tree / MARKER.lstrip("/")).write_text(script)
        (t / "early.cfg").write_text(render("grub-bios.cfg.j2", marker=MARKER))
        _run(["grub-mkimage", "-O", "i386-pc-eltorito", "-d", str(GRUB_PC), "-p", "/boot/grub",
              "-c", str(t / "early.cfg"), "-o", str(tree / "boot/grub/eltorito.img"), *GRUB_MODULES],
             "build the BIOS boot image")
        efi_image(t / "efi.img", {"EFI/BOOT/BOOTX64.EFI": efi, "EFI/BOOT/autoexec.ipxe": tree / MARKER.lstrip("/"),
                                  "autoexec.ipxe": tree / MARKER.lstrip("/")})
        tmp_out = out.with_name(out.name + ".part")
        _run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", VOLUME_ID, "-o", str(tmp_out),
              "--grub2-mbr", str(GRUB_PC / "boot_hybrid.img"),
              "-b", "boot/grub/eltorito.img", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
              "--grub2-boot-info",
              "--efi-boot", "efi.img", "-efi-boot-part", "--efi-boot-image", "--protective-msdos-label",
              "-graft-points", str(tree), f"/efi.img={t / 'efi.img'}"],
             "assemble the ISO")
    report = el_torito_report(tmp_out)
    found = boot_platforms(report)
    if found != {"BIOS", "UEFI"}:
        tmp_out.unlink(missing_ok=True)
        raise errors.LabctlError(f"the ISO has boot entries for {sorted(found) or 'nothing'}, not BIOS and UEFI")
    tmp_out.replace(out)
    return report


@click.command()
@click.option("-O", "--output-file", "out", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Where to write the ISO (CD image, or dd it to a USB stick).")
@click.option("--bastion", "bastion", metavar="URL", help="Bastion URL the ISO asks (default: the bastionUrl setting).")
@click.option("--ipxe-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=IPXE_DIR,
              show_default=True, help="Where ipxe.lkrn and ipxe.efi come from.")
@output_option
@pass_ctx
def makeiso(obj: Ctx, out: Path, bastion: str | None, ipxe_dir: Path) -> None:
    """Build a hybrid (BIOS + UEFI) boot ISO whose iPXE chains to the bastion's /dispatch with the
    machine's MAC, for machines that cannot PXE-boot."""
    url = config.check_value("bastionUrl", bastion or obj.settings["bastionUrl"])
    entries = sorted(boot_platforms(build_iso(out, url, ipxe_dir)))
    result = {"file": str(out), "bytes": out.stat().st_size, "boot_entries": entries, "dispatch": f"{url}/dispatch"}
    output.emit(result, obj.output, lambda: click.echo(
        f"wrote {out} ({result['bytes'] // 1024} KiB; boot entries: {', '.join(entries)}; chains to {url}/dispatch)"))
