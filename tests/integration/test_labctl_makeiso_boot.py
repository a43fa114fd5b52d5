"""The `labctl provision makeiso` ISO really boots (QEMU, TCG, no NIC option ROM).

The VM's only network is QEMU's user-mode network with restrict=on: it reaches nothing but the
test's own HTTP server, forwarded at 10.0.2.100:80 (guestfwd). The ISO is built for
http://10.0.2.100:80.

- BIOS: GRUB starts Debian's ipxe.lkrn with the script as initrd; iPXE does DHCP and fetches
  /dispatch?mac=<the VM's MAC> from the test server.
- UEFI (OVMF): the El Torito EFI entry starts Debian's ipxe.efi, which configures the network. That
  2019 iPXE ignores autoexec.ipxe, so it stops at "Nothing to boot" when DHCP names no boot file
  (see docs/cli.md); the test checks exactly that, so it notices when a newer iPXE changes it.
"""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from labctl.makeiso import build_iso
from tests.support import need, need_binary, stop_process, wait_for

OVMF = Path("/usr/share/ovmf/OVMF.fd")
MAC = "52:54:00:1a:2b:3c"


@pytest.fixture
def dispatch_server():
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            body = b"#!ipxe\necho lab-platform test dispatch\nsleep 300\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], hits
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    need_binary("xorriso", "mformat", "grub-mkimage", "qemu-system-x86_64")
    out = tmp_path_factory.mktemp("iso") / "lab.iso"
    build_iso(out, "http://10.0.2.100:80")
    return out


def boot(iso: Path, port: int, serial: Path, *firmware: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", *firmware, "-display", "none", "-monitor", "none",
         "-serial", f"file:{serial}", "-cdrom", str(iso), "-boot", "d",
         "-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:{port}",
         "-device", f"e1000,netdev=n0,romfile=,mac={MAC}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_bios_boot_reaches_dispatch_with_the_mac(iso, dispatch_server, tmp_path):
    port, hits = dispatch_server
    vm = boot(iso, port, tmp_path / "serial.log")
    try:
        wait_for(lambda: hits or vm.poll() is not None, timeout=240, interval=0.5, what="GET /dispatch from the VM")
        assert vm.poll() is None, vm.stderr.read().decode()
    finally:
        stop_process(vm, 10)
    assert hits[0] == "/dispatch?mac=" + MAC.replace(":", "%3A")


def test_uefi_boot_starts_ipxe_from_the_iso(iso, dispatch_server, tmp_path):
    need(OVMF.exists(), f"needs OVMF ({OVMF}, Debian package ovmf)")
    port, hits = dispatch_server
    serial = tmp_path / "serial.log"
    vm = boot(iso, port, serial, "-bios", str(OVMF))

    def text() -> str:
        return serial.read_bytes().decode("latin-1") if serial.exists() else ""

    try:
        wait_for(lambda: "Nothing to boot" in text() or hits or vm.poll() is not None, timeout=300, interval=1,
                 what="iPXE from the ISO's EFI image")
    finally:
        stop_process(vm, 10)
    log = text()
    assert 'starting Boot0001 "UEFI QEMU DVD-ROM' in log
    assert "iPXE initialising devices" in log and f"net0: {MAC}" in log and "net0: 10.0.2.15" in log
    if not hits:  # Debian's iPXE: no autoexec.ipxe support; a newer one would have reached /dispatch
        assert "Nothing to boot" in log
