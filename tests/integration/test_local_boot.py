"""The UEFI local-boot GRUB: its embedded config and the real grub-mkstandalone build through the
CLI. (That it finds and chainloads a disk's EFI loader is shown by booting it in
tests/e2e/test_scenarios.py::test_installed_uefi_machine_boots_its_local_disk.)"""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

from bastion_app.cli import main
from bastion_app.images.local_boot import GRUB_EFI_DIR, LOADERS, config_text
from tests.support import need, need_binary


def test_config_tries_distribution_loaders_then_the_fallback_path():
    text = config_text()
    loop = next(line for line in text.splitlines() if line.startswith("for loader in "))
    assert loop == f"for loader in {' '.join(LOADERS)}; do"
    assert LOADERS[-1] == "/EFI/BOOT/BOOTX64.EFI"
    assert 'search --no-floppy --file --set=root "$loader"' in text
    assert 'chainloader "$loader"' in text
    assert text.rstrip().endswith("exit")  # nothing found: back to the firmware


@pytest.mark.parametrize("bad", ["/EFI/x; reboot", "/boot/vmlinuz", "/EFI/a b", "/EFI/$x", "/EFI/x\nreboot"])
def test_config_refuses_paths_that_could_add_grub_commands(bad):
    with pytest.raises(ValueError):
        config_text([bad])


def test_cli_builds_a_pe_image_with_the_config_inside(tmp_path):
    need_binary("grub-mkstandalone")
    need((GRUB_EFI_DIR / "modinfo.sh").exists(), "needs Debian's grub-efi-amd64-bin")
    result = CliRunner().invoke(main, ["images", "build-local-boot", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "images" / "local-boot" / "grubx64.efi"
    assert result.output.strip().endswith(str(out))
    data = out.read_bytes()
    assert data[:2] == b"MZ"
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[pe:pe + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", data, pe + 4)[0] == 0x8664  # x86-64
    assert 100_000 < len(data) < 3_000_000
    assert not list(out.parent.glob(".*.tmp"))
