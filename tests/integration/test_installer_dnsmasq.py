"""A real `lab-bastion serve` starts a real dnsmasq on a veth in its own network namespace; a
scripted PXE client in a second namespace checks what each kind of client is told:

- BIOS firmware (arch 0): proxy offer with a PXE boot menu, then the boot-server request on port
  4011 answers `undionly.kpxe`, fetched by TFTP byte for byte;
- UEFI x86-64 firmware (arch 7): the port-4011 request answers `snponly.efi`;
- iPXE (option 175, user class iPXE), BIOS and UEFI: the proxy offer carries the HTTP dispatch URL
  and the bastion as next-server, and no boot menu;
- full DHCP: an address from the range plus the same boot files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import need, need_binary, need_root, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"


# -- a minimal DHCP/PXE client (runs inside the client namespace) ------------------------------
def _packet(mac: str, msgtype: int, arch: int | None, ipxe: bool, ciaddr: str, extra: bytes) -> tuple[int, bytes]:
    xid = random.getrandbits(32)
    hw = bytes.fromhex(mac.replace(":", ""))
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, socket.inet_aton(ciaddr),
                       bytes(4), bytes(4), bytes(4), hw.ljust(16, b"\0"), b"", b"")
    vendor = b"PXEClient:Arch:%05d:UNDI:002001" % (arch or 0)
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, msgtype, 60, len(vendor)]) + vendor
    if arch is not None:
        opts += bytes([93, 2]) + struct.pack("!H", arch) + bytes([94, 3, 1, 2, 1, 97, 17, 0]) + bytes(16)
    if ipxe:
        opts += bytes([77, 4]) + b"iPXE" + bytes([175, 3, 0xB1, 1, 1])
    return xid, head + opts + extra + b"\xff"


def _parse(data: bytes) -> dict:
    f = struct.unpack("!BBBBIHH4s4s4s4s16s64s128s", data[:236])
    out = {"xid": f[4], "yiaddr": socket.inet_ntoa(f[8]), "siaddr": socket.inet_ntoa(f[9]),
           "file": f[13].rstrip(b"\0").decode(), "opts": {}}
    o, i = data[240:], 0
    while i < len(o) and o[i] != 255:
        if o[i] == 0:
            i += 1
            continue
        out["opts"][str(o[i])] = o[i + 2 : i + 2 + o[i + 1]].hex()
        i += 2 + o[i + 1]
    return out


def probe(iface: str, mac: str, msgtype: int = 1, arch: int | None = None, ipxe: bool = False,
          dest: str = "255.255.255.255", dport: int = 67, sport: int = 68, ciaddr: str = "0.0.0.0",
          extra_hex: str = "", timeout: float = 8.0) -> list[dict]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", sport))
    s.settimeout(timeout)
    xid, pkt = _packet(mac, msgtype, arch, ipxe, ciaddr, bytes.fromhex(extra_hex))
    s.sendto(pkt, (dest, dport))
    replies = []
    try:
        while True:
            r = _parse(s.recvfrom(2048)[0])
            if r["xid"] == xid:
                replies.append(r)
                s.settimeout(0.5)
    except TimeoutError:
        pass
    finally:
        s.close()
    return replies


# -- namespaces ------------------------------------------------------------------------------
def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def netns():
    need_root()
    need_binary("ip", "dnsmasq", "curl")
    tag = f"lbd{os.getpid() % 100000}{random.randrange(100)}"
    srv, cli = tag + "s", tag + "c"
    try:
        sh("ip", "netns", "add", srv)
        sh("ip", "netns", "add", cli)
        sh("ip", "link", "add", tag + "a", "type", "veth", "peer", "name", tag + "b")
        sh("ip", "link", "set", tag + "a", "netns", srv)
        sh("ip", "link", "set", tag + "b", "netns", cli)
        sh("ip", "-n", srv, "addr", "add", f"{SERVER_IP}/24", "dev", tag + "a")
        sh("ip", "-n", cli, "addr", "add", f"{CLIENT_IP}/24", "dev", tag + "b")
        for ns, dev in ((srv, tag + "a"), (cli, tag + "b"), (srv, "lo"), (cli, "lo")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # an interface without an address, for the error case
        sh("ip", "-n", srv, "link", "add", tag + "d", "type", "veth", "peer", "name", tag + "e")
        sh("ip", "-n", srv, "link", "set", tag + "d", "up")
    except subprocess.CalledProcessError as exc:
        for ns in (srv, cli):
            sh("ip", "netns", "del", ns, check=False)
        need(False, f"cannot create network namespaces: {exc.stderr.strip()}")
    yield {"srv": srv, "cli": cli, "srv_if": tag + "a", "cli_if": tag + "b", "bare_if": tag + "d"}
    for ns in (srv, cli):
        sh("ip", "netns", "del", ns, check=False)


def client(ns: dict, **kw) -> list[dict]:
    code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r}); "
            "from tests.integration.test_installer_dnsmasq import probe; "
            f"print(json.dumps(probe(**json.loads({json.dumps(json.dumps(kw))}))))")
    out = sh("ip", "netns", "exec", ns["cli"], sys.executable, "-c", code)
    return json.loads(out.stdout)


def serve(ns: dict, data: Path, *args: str) -> subprocess.Popen:
    log = open(data.parent / "serve.log", "ab")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(["ip", "netns", "exec", ns["srv"], sys.executable, "-m", "bastion_app.cli", "serve",
                             "--data-dir", str(data), "--listen", f"{SERVER_IP}:8080", "--workers", "1", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


DISPATCH = f"http://{SERVER_IP}:8080/dispatch?mac=${{netX/mac}}"
BOOT_ITEM = "2b07470480000000ff"  # option 43: PXE_BOOT_ITEM type 0x8000 layer 0


def ipxe_offer(ns: dict, mac: str, arch: int) -> dict:
    """The proxy offer iPXE gets for its DHCPDISCOVER. iPXE takes a ProxyDHCP offer as complete
    when it has a next-server and a file name (dhcp_has_pxeopts in iPXE's net/udp/dhcp.c: then it
    sends no ProxyDHCPREQUEST to port 4011), and it boots that file name when the offer has no PXE
    boot menu (have_pxe_menu in usr/autoboot.c)."""
    [offer] = client(ns, iface=ns["cli_if"], mac=mac, arch=arch, ipxe=True)
    assert offer["yiaddr"] == "0.0.0.0"  # proxy: no address from us
    assert bytes.fromhex(offer["opts"]["60"]) == b"PXEClient"
    vendor = bytes.fromhex(offer["opts"].get("43", ""))
    assert b"lab-platform" not in vendor  # no boot menu (option 43, sub-option 9) for iPXE
    return offer


def test_proxy_dhcp_answers_bios_uefi_and_ipxe(netns, tmp_path):
    data = tmp_path / "data"
    proc = serve(netns, data, "--interface", netns["srv_if"])
    try:
        wait_for(lambda: client(netns, iface=netns["cli_if"], mac="52:54:00:aa:00:01", arch=7, ipxe=True),
                 timeout=30, interval=0.5, what="dnsmasq proxy offer")
        for arch in (0, 7):  # iPXE on BIOS (undionly.kpxe, a NIC's iPXE ROM) and UEFI (snponly.efi)
            offer = ipxe_offer(netns, "52:54:00:aa:00:01", arch)
            assert (offer["siaddr"], offer["file"]) == (SERVER_IP, DISPATCH), arch

        bios = client(netns, iface=netns["cli_if"], mac="52:54:00:aa:00:02", arch=0)
        assert bios and bios[0]["yiaddr"] == "0.0.0.0"
        assert b"lab-platform iPXE (BIOS)" in bytes.fromhex(bios[0]["opts"]["43"])  # the PXE menu
        # the ROM then asks the boot server (port 4011) for the menu item
        item = client(netns, iface=netns["cli_if"], mac="52:54:00:aa:00:02", msgtype=3, arch=0, dest=SERVER_IP,
                      dport=4011, sport=4011, ciaddr=CLIENT_IP, extra_hex=BOOT_ITEM)
        assert item[0]["file"] == "undionly.kpxe" and item[0]["siaddr"] == SERVER_IP

        efi = client(netns, iface=netns["cli_if"], mac="52:54:00:aa:00:03", msgtype=3, arch=7, dest=SERVER_IP,
                     dport=4011, sport=4011, ciaddr=CLIENT_IP)
        assert efi[0]["file"] == "snponly.efi" and efi[0]["siaddr"] == SERVER_IP

        for name in ("undionly.kpxe", "snponly.efi"):
            got = tmp_path / name
            sh("ip", "netns", "exec", netns["cli"], "curl", "-sf", "-o", str(got), f"tftp://{SERVER_IP}/{name}")
            assert got.read_bytes() == Path("/usr/lib/ipxe", name).read_bytes()
        # pid and lease files in <data>/run; DHCP log on the supervisor's stderr
        assert (data / "run" / "dnsmasq.pid").exists()
        log = (tmp_path / "serve.log").read_text()
        assert "proxy on subnet 10.77.0.0" in log and "DNS disabled" in log
    finally:
        stop_process(proc, group=True)
    assert proc.returncode == 0


def test_full_dhcp_hands_out_addresses(netns, tmp_path):
    proc = serve(netns, tmp_path / "data", "--interface", netns["srv_if"], "--dhcp-mode", "full",
                 "--dhcp-range", "10.77.0.100,10.77.0.150")
    try:
        bios = wait_for(lambda: client(netns, iface=netns["cli_if"], mac="52:54:00:bb:00:01", arch=0),
                        timeout=30, interval=0.5, what="dnsmasq offer")
        ip = bios[0]["yiaddr"]
        assert 100 <= int(ip.rsplit(".", 1)[1]) <= 150 and ip.startswith("10.77.0.")
        assert bios[0]["file"] == "undionly.kpxe"
        efi = client(netns, iface=netns["cli_if"], mac="52:54:00:bb:00:02", arch=7)
        assert efi[0]["file"] == "snponly.efi"
        ipxe = client(netns, iface=netns["cli_if"], mac="52:54:00:bb:00:03", arch=0, ipxe=True)
        assert ipxe[0]["file"] == DISPATCH
    finally:
        stop_process(proc, group=True)


def test_interface_without_address_is_a_clear_error(netns, tmp_path):
    proc = serve(netns, tmp_path / "data", "--interface", netns["bare_if"])
    try:
        proc.wait(timeout=60)
    finally:
        stop_process(proc, group=True)
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode != 0
    assert f"interface '{netns['bare_if']}' has no IPv4 address" in log


def test_dnsmasq_is_restarted_by_the_supervisor(netns, tmp_path):
    data = tmp_path / "data"
    proc = serve(netns, data, "--interface", netns["srv_if"])
    try:
        pidfile = data / "run" / "dnsmasq.pid"
        first = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30, what="dnsmasq pid")
        os.kill(int(first), signal.SIGKILL)
        wait_for(lambda: pidfile.read_text().strip() not in ("", first), timeout=30, what="dnsmasq restarted")
        time.sleep(0.5)
        assert ipxe_offer(netns, "52:54:00:cc:00:01", 7)["file"] == DISPATCH
    finally:
        stop_process(proc, group=True)
