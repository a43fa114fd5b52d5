"""The discovery environment: its JSON escaper, its inventory on this host, and real boots in QEMU.

The boot tests build the image (cached under /var/cache/lab-platform/discovery), then boot it in QEMU
(TCG) with -kernel/-initrd inside a network namespace created by the test: the VM's only network is
a tap device in that namespace, where a dnsmasq (DHCP only) and the test's own HTTP server listen.
The VM can reach nothing else. A second NIC (e1000, isolated user-mode network) checks that the
boot NIC is chosen by BOOTIF, not by order.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.support import need, need_binary, need_root, stop_process, wait_for

LIB = Path(__file__).resolve().parents[2] / "bastion_app" / "images" / "discovery" / "lib.sh"
OVMF = Path("/usr/share/ovmf/OVMF.fd")

HOSTILE = [
    "",
    "plain",
    'say "hi"',
    "back\\slash\\",
    '\\"',
    "\\u0000",
    "new\nline\r\n",
    "tab\there",
    "\x01\x02\x1b[31m\x1f\x7f",
    "é ü ß 中文 😀 \u2028",
    "'; rm -rf / #",
    "$(reboot) `id` $HOME ${PATH}",
    "  padded  ",
    "%s %d %c %%",
    "-n",
    "-e",
    "}]},{\"injected\": true",
]


def _json_str(value: bytes | str, fn: str = "json_str") -> bytes:
    arg = value.encode() if isinstance(value, str) else value
    script = b'. "$0"; ' + fn.encode() + b' "$1"'
    proc = subprocess.run([b"busybox", b"sh", b"-c", script, str(LIB).encode(), arg],
                          capture_output=True, check=True, timeout=30)
    return proc.stdout


@pytest.mark.parametrize("value", HOSTILE)
def test_json_escaper_round_trips_hostile_strings(value):
    need_binary("busybox")
    out = _json_str(value)
    assert out.isascii(), out
    assert json.loads(out) == value


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\xc3", b"ok\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf5\x80\x80\x80"])
def test_json_escaper_replaces_invalid_utf8(raw):
    need_binary("busybox")
    out = _json_str(raw)
    assert out.isascii(), out
    decoded = json.loads(out)
    assert "\ufffd" in decoded
    assert decoded.replace("\ufffd", "") == raw.decode("utf-8", "ignore")


@pytest.mark.parametrize("value", HOSTILE + ["x" * 300, "é" * 255 + "😀😀", "\t" * 300])
def test_json_text_is_always_accepted_by_the_bastion(value):
    """Free-text fields: escaped like json_str, but control characters become spaces and the value
    is cut to 256 characters, so that the bastion's Text type accepts any vendor's string."""
    need_binary("busybox")
    from labcore.schemas import Dmi

    out = _json_str(value, "json_text")
    assert out.isascii(), out
    text = json.loads(out)
    expected = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in value)[:256]
    assert text == expected
    assert Dmi.model_validate_json(b'{"vendor": ' + out + b"}").vendor == expected


def _check_inventory(hw: dict) -> None:
    """The exact shape /api/discover validates."""
    assert set(hw) - {"bmc"} == {"cpu", "memory_mb", "disks", "nics", "dmi", "firmware"}
    cpu = hw["cpu"]
    assert set(cpu) == {"model", "cores", "threads", "arch"}
    assert isinstance(cpu["model"], str) and cpu["arch"] == "x86_64"
    assert isinstance(cpu["cores"], int) and isinstance(cpu["threads"], int) and cpu["threads"] >= cpu["cores"] >= 1
    assert isinstance(hw["memory_mb"], int) and hw["memory_mb"] > 0
    for disk in hw["disks"]:
        assert set(disk) == {"name", "size_bytes", "model", "serial", "rotational", "removable", "transport"}
        assert isinstance(disk["size_bytes"], int)
        assert isinstance(disk["rotational"], bool) and isinstance(disk["removable"], bool)
        assert disk["transport"] in {"nvme", "sata", "virtio", "usb", "scsi", "unknown"}
    for nic in hw["nics"]:
        assert set(nic) == {"name", "mac", "driver", "link", "speed_mbps"}
        assert isinstance(nic["link"], bool)
        assert nic["speed_mbps"] is None or isinstance(nic["speed_mbps"], int)
    assert set(hw["dmi"]) == {"vendor", "product", "serial", "uuid", "bios_vendor", "bios_version"}
    assert all(isinstance(v, str) for v in hw["dmi"].values())
    assert hw["firmware"] in {"bios", "uefi"}


def test_inventory_of_this_host_has_the_api_shape():
    """The same library, run against this machine's /proc and /sys (it only reads)."""
    need_binary("busybox")
    proc = subprocess.run(["busybox", "sh", "-c", '. "$0"; discover_json AA:BB:CC:00:11:22', str(LIB)],
                          capture_output=True, check=True, timeout=60)
    body = json.loads(proc.stdout)
    assert body["mac"] == "AA:BB:CC:00:11:22"
    _check_inventory(body["hardware"])
    assert body["hardware"]["cpu"]["threads"] == os.cpu_count()
    from labcore.schemas import DiscoverRequest

    DiscoverRequest.model_validate_json(proc.stdout)  # what the bastion's /api/discover accepts


def test_an_ipmi_device_is_reported_as_a_bmc(tmp_path):
    """/dev/ipmi0 (or an SMBIOS IPMI record) adds "bmc": {"ipmi": true}; without, no bmc field."""
    need_binary("busybox")
    dev = tmp_path / "dev"
    dev.mkdir()

    def hardware() -> dict:
        proc = subprocess.run(["busybox", "sh", "-c", '. "$0"; discover_json AA:BB:CC:00:11:23', str(LIB)],
                              capture_output=True, check=True, timeout=60, env={**os.environ, "DEVDIR": str(dev)})
        from labcore.schemas import DiscoverRequest

        return DiscoverRequest.model_validate_json(proc.stdout).stored_hardware()

    if not Path("/sys/firmware/dmi/entries/38-0").exists():
        assert "bmc" not in hardware()
    (dev / "ipmi0").touch()
    assert hardware()["bmc"] == {"ipmi": True, "address": None}


# `ipmitool lan print 1` of a BMC with a static address (the layout of ipmitool 1.8.19's lan.c)
LAN_PRINT = """Set in Progress         : Set Complete
Auth Type Support       : NONE MD2 MD5 PASSWORD
Auth Type Enable        : Callback : MD2 MD5 PASSWORD
                        : User     : MD2 MD5 PASSWORD
IP Address Source       : Static Address
IP Address              : {address}
Subnet Mask             : 255.255.255.0
MAC Address             : 0c:c4:7a:12:34:56
SNMP Community String   : public
Default Gateway IP      : 10.0.1.1
802.1q VLAN ID          : Disabled
Cipher Suite Priv Max   : XaaaXXaaaXXaaXX
"""


@pytest.mark.parametrize(("address", "reported"), [
    ("10.0.1.22", "10.0.1.22"),
    ("0.0.0.0", None),  # unconfigured
    ('10.0.1.22", "x": "y', None),
    ("10.0.1.256", None),
    ("010.0.1.22", None),
    ("fe80::1", None),
])
def test_a_bmc_lan_address_is_read_with_ipmitool(tmp_path, address, reported):
    """The image's ipmitool (here a stand-in printing a recorded `lan print`) is asked channel by
    channel; only a valid IPv4 address other than 0.0.0.0 is reported, and the JSON always parses."""
    need_binary("busybox")
    from labcore.schemas import DiscoverRequest

    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "ipmi0").touch()
    (tmp_path / "lan2.txt").write_text(LAN_PRINT.format(address=address))
    tool = tmp_path / "ipmitool"
    # channel 1 is not a LAN channel on this board: the address comes from channel 2
    tool.write_text(f'#!/bin/sh\n[ "$*" = "-I open lan print 2" ] && exec cat {tmp_path}/lan2.txt\n'
                    'echo "Channel $4 is not a LAN channel" >&2\nexit 1\n')
    tool.chmod(0o755)
    proc = subprocess.run(["busybox", "sh", "-c", '. "$0"; discover_json AA:BB:CC:00:11:24', str(LIB)],
                          capture_output=True, check=True, timeout=60,
                          env={**os.environ, "DEVDIR": str(dev), "IPMITOOL": str(tool)})
    hardware = DiscoverRequest.model_validate_json(proc.stdout).stored_hardware()
    assert hardware["bmc"] == {"ipmi": True, "address": reported}


# --------------------------------------------------------------------------------------------------
# booting the image


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    need_binary("apt-get", "apt-cache", "dpkg-deb", "qemu-system-x86_64", "dnsmasq", "ip")
    from bastion_app.images.discovery import build_discovery

    out = tmp_path_factory.mktemp("images") / "discovery"
    started = time.monotonic()
    img = build_discovery(None, out, progress=lambda msg: None)
    seconds = time.monotonic() - started
    manifest = json.loads(img.manifest.read_text())
    _report(f"discovery image: kernel {img.kernel.stat().st_size / 1e6:.1f} MB + initrd "
            f"{img.initrd.stat().st_size / 1e6:.1f} MB = {img.size_bytes / 1e6:.1f} MB, "
            f"{len(img.modules)} modules, hash {img.inputs_hash}, "
            f"{'cached' if img.cached else 'built'} in {seconds:.1f} s "
            f"(first build {manifest.get('build_seconds')} s)")
    # A second build with the same inputs comes from the cache.
    again_started = time.monotonic()
    again = build_discovery(None, out, progress=lambda msg: None)
    assert again.cached and again.inputs_hash == img.inputs_hash
    assert time.monotonic() - again_started < 5  # nothing is queried, downloaded or unpacked
    return img


def _report(line: str) -> None:
    # Shown by pytest -s and in the CI log; the figures go into docs/discovery.md.
    print(f"\n[discovery] {line}", flush=True)
    path = os.environ.get("LAB_DISCOVERY_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


CLONE_NEWNET = 0x40000000
_NS_COUNTER = itertools.count()


class _Server:
    """A real HTTP server whose socket lives in the namespace ``ns``; records /api/discover posts."""

    def __init__(self, ns: str, host: str, port: int):
        self.posts: list[tuple[float, dict]] = []
        self.fail_first = 0  # answer this many POSTs with 503 (the image must retry)
        self.rejected = 0
        self.other: list[str] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/api/discover" or self.headers.get("Content-Type") != "application/json":
                    outer.other.append(f"POST {self.path} {self.headers.get('Content-Type')}")
                    self.send_error(404)
                    return
                if outer.rejected < outer.fail_first:
                    outer.rejected += 1
                    self.send_error(503, "try again")
                    return
                outer.posts.append((time.monotonic(), json.loads(body)))
                reply = b'{"status": "discovered"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self):  # noqa: N802
                outer.other.append(f"GET {self.path}")
                self.send_error(404)

            def log_message(self, *args):
                pass

        def run():
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{ns}") as fh:  # this thread only: setns is per thread
                    if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                self.httpd = HTTPServer((host, port), Handler)
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self.error = exc
                self.ready.set()
                return
            self.ready.set()
            self.httpd.serve_forever(poll_interval=0.2)

        self.thread = threading.Thread(target=run, daemon=True, name=f"http-{ns}")
        self.thread.start()
        self.ready.wait(10)
        if self.error:
            raise self.error

    def stop(self):
        if getattr(self, "httpd", None):
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def lab_net(tmp_path):
    """A network namespace with tap0 (10.231.7.1/24), dnsmasq for DHCP and the test HTTP server."""
    need_root()
    need(Path("/dev/net/tun").exists(), "needs /dev/net/tun for QEMU tap devices")
    ns = f"ldisc-{os.getpid()}-{next(_NS_COUNTER)}"

    def sh(*args):
        subprocess.run(args, check=True, capture_output=True, timeout=30)

    sh("ip", "netns", "add", ns)
    dnsmasq = server = None
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        sh("ip", "-n", ns, "addr", "add", "10.231.7.1/24", "dev", "tap0")
        sh("ip", "-n", ns, "link", "set", "tap0", "up")
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
             "--interface=tap0", "--dhcp-range=10.231.7.50,10.231.7.99,255.255.255.0,1h",
             f"--dhcp-leasefile={tmp_path}/leases", "--pid-file", "--user=root", "--log-facility=-"],
            stdout=open(tmp_path / "dnsmasq.log", "wb"), stderr=subprocess.STDOUT)
        server = _Server(ns, "10.231.7.1", 8080)
        yield {"ns": ns, "server": server, "url": "http://10.231.7.1:8080", "dir": tmp_path}
    finally:
        if server:
            server.stop()
        if dnsmasq:
            stop_process(dnsmasq, 10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


BOOT_MAC = "52:54:00:d1:5c:01"
OTHER_MAC = "52:54:00:d1:5c:02"
DISK_SERIAL = "LAB-DISK-0001"
SMBIOS_VENDOR = 'Lab "Quoted" Vendor\\Inc'
VM_UUID = "6f1c2a8e-5b1d-4c3e-9a7f-0d15c0e4a001"


def _boot(image, lab_net, *, uefi: bool, timeout: float, bootif: bool = True,
          boot_nic: str = "virtio-net-pci", other_nic: str = "e1000", extra: tuple[str, ...] = ()):
    need_binary("qemu-system-x86_64")
    if uefi:
        need(OVMF.exists(), f"needs {OVMF} (Debian package ovmf)")
    work: Path = lab_net["dir"]
    disk = work / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(1 << 30)  # sparse 1 GiB
    serial_log = work / "serial.log"
    append = ((f"BOOTIF=01-{BOOT_MAC.replace(':', '-')} " if bootif else "")
              + f"console=ttyS0 lab.url={lab_net['url']} "
              "lab.action=poweroff panic=-1")
    cmd = [
        "ip", "netns", "exec", lab_net["ns"],
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35" if uefi else "pc",
        "-smp", "2", "-m", "768", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{serial_log}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-uuid", VM_UUID,
        "-smbios", "type=1,manufacturer=" + SMBIOS_VENDOR.replace(",", ",,") + ",serial=SN-4242",
        # not the boot NIC: an isolated user-mode network (DHCP works, the bastion is unreachable)
        "-netdev", "user,id=n1,restrict=on", "-device", f"{other_nic},netdev=n1,mac={OTHER_MAC}",
        # the boot NIC, on the namespace's tap
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", f"{boot_nic},netdev=n0,mac={BOOT_MAC}",
        "-drive", f"file={disk},if=none,id=d0,format=raw",
        "-device", f"virtio-blk-pci,drive=d0,serial={DISK_SERIAL}",
        *extra,
    ]
    if uefi:
        cmd[cmd.index("-no-reboot"):cmd.index("-no-reboot")] = ["-bios", str(OVMF)]
    server = lab_net["server"]
    started = time.monotonic()
    qemu = subprocess.Popen(cmd, stdout=open(work / "qemu.log", "wb"), stderr=subprocess.STDOUT)
    try:
        try:
            wait_for(lambda: server.posts or qemu.poll() is not None, timeout=timeout, interval=0.2,
                     what="the discovery POST")
        except TimeoutError:
            pass
        console = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        assert server.posts, (f"no POST to /api/discover within {timeout:.0f} s (other requests: {server.other})"
                              f"\n--- serial console (tail) ---\n{console[-4000:]}")
        post_at, body = server.posts[0]
        try:
            qemu.wait(60)  # it powers itself off
        except subprocess.TimeoutExpired:
            pytest.fail("the machine did not power off after reporting\n" + serial_log.read_text(errors="replace")[-3000:])
        halted_at = time.monotonic()
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait(10)
    console = serial_log.read_text(errors="replace")
    assert re.search(r"lab-discovery: \[[0-9.]+\] powering off", console), console[-3000:]
    return body, post_at - started, halted_at - started, console


def _check_vm_inventory(body: dict, firmware: str, boot_driver: str = "virtio_net", other_driver: str = "e1000") -> None:
    from labcore.schemas import DiscoverRequest

    DiscoverRequest.model_validate_json(json.dumps(body))  # what the bastion's /api/discover accepts
    assert body["mac"] == BOOT_MAC
    hw = body["hardware"]
    _check_inventory(hw)
    assert hw["cpu"]["threads"] == 2
    assert hw["cpu"]["arch"] == "x86_64"
    assert 640 <= hw["memory_mb"] <= 768, hw["memory_mb"]
    disks = {d["serial"]: d for d in hw["disks"]}
    assert DISK_SERIAL in disks, hw["disks"]
    disk = disks[DISK_SERIAL]
    assert disk["size_bytes"] == 1 << 30
    assert disk["transport"] == "virtio" and disk["name"].startswith("vd")
    assert disk["removable"] is False
    nics = {n["mac"]: n for n in hw["nics"]}
    assert nics[BOOT_MAC]["driver"] == boot_driver and nics[BOOT_MAC]["link"] is True
    assert nics[OTHER_MAC]["driver"] == other_driver and nics[OTHER_MAC]["link"] is True
    assert hw["dmi"]["vendor"] == SMBIOS_VENDOR
    assert hw["dmi"]["serial"] == "SN-4242"
    assert hw["dmi"]["uuid"].lower() == VM_UUID
    assert hw["firmware"] == firmware


def _kernel_times(console: str) -> str:
    """Kernel uptime at the milestones /init logs ("lab-discovery: [12.34] ...")."""
    marks = {"modules loaded": "modules", "network up": "network", "inventory collected": "inventory",
             "reported to": "POST"}
    found = []
    for line in console.splitlines():
        m = re.match(r"lab-discovery: \[([0-9.]+)\] (.*)", line.strip())
        if m:
            for prefix, label in marks.items():
                if m.group(2).startswith(prefix):
                    found.append(f"{label} {float(m.group(1)):.1f}")
    return "kernel uptime at " + ", ".join(found) + " s"


@pytest.mark.slow
def test_discovery_boots_and_reports_bios(image, lab_net):
    lab_net["server"].fail_first = 1
    body, to_post, to_halt, console = _boot(image, lab_net, uefi=False, timeout=180)
    _check_vm_inventory(body, "bios")
    assert lab_net["server"].rejected == 1 and len(lab_net["server"].posts) == 1
    assert "(attempt 1/8)" in console and "(attempt 2)" in console, console[-2000:]
    # only the drivers for the VM's PCI devices were loaded
    assert "e1000: Intel(R) PRO/1000 Network Driver" in console
    assert "10 Gigabit PCI Express" not in console and "r8169" not in console
    assert "console=ttyS0" not in json.dumps(json.loads(image.manifest.read_text()))
    _report(f"BIOS (SeaBIOS, TCG): QEMU start -> POST /api/discover {to_post:.1f} s, powered off at {to_halt:.1f} s"
            f"; {_kernel_times(console)}; memory_mb {body['hardware']['memory_mb']} of 768")


@pytest.mark.slow
def test_discovery_boots_and_reports_uefi(image, lab_net):
    body, to_post, to_halt, console = _boot(image, lab_net, uefi=True, timeout=420)
    _check_vm_inventory(body, "uefi")
    _report(f"UEFI (OVMF, q35, TCG): QEMU start -> POST /api/discover {to_post:.1f} s, powered off at {to_halt:.1f} s"
            f"; {_kernel_times(console)}; memory_mb {body['hardware']['memory_mb']} of 768")


@pytest.mark.slow
def test_discovery_without_bootif_reports_through_the_nic_that_reaches_the_bastion(image, lab_net):
    """No BOOTIF: eth0 (virtio) gets a lease on an isolated network where the bastion is unreachable;
    the image moves on to eth1 (e1000, on the bastion's network) and reports under eth1's MAC."""
    body, to_post, _, console = _boot(image, lab_net, uefi=False, timeout=240, bootif=False,
                                      boot_nic="e1000", other_nic="virtio-net-pci")
    _check_vm_inventory(body, "bios", boot_driver="e1000", other_driver="virtio_net")
    tried = re.findall(r"lab-discovery: \[[0-9.]+\] trying (eth[0-9]+)", console)
    assert tried == ["eth0", "eth1"], console[-3000:]
    _report(f"BIOS without BOOTIF, bastion behind the second NIC: QEMU start -> POST {to_post:.1f} s")


@pytest.mark.slow
def test_discovery_reports_the_emulated_ipmi_bmc(image, lab_net):
    """QEMU's BMC simulator on a KCS interface: SMBIOS type 38 describes it, /init loads ipmi_si,
    ipmi_devintf makes /dev/ipmi0 and ipmitool asks it for the LAN address. QEMU 7.2's simulator
    implements no transport commands (Get LAN Configuration Parameters), so the report has no
    address: the recorded `lan print` of a real BMC checks the parser (test_a_bmc_lan_address_...)."""
    body, to_post, _, console = _boot(image, lab_net, uefi=False, timeout=180,
                                      extra=("-device", "ipmi-bmc-sim,id=bmc0", "-device", "isa-ipmi-kcs,bmc=bmc0"))
    _check_vm_inventory(body, "bios")
    assert "module ipmi_si did not load" not in console
    assert re.search(r"ipmi_si .*: IPMI kcs interface initialized", console), console[-3000:]
    assert body["hardware"]["bmc"] == {"ipmi": True}, body["hardware"]
    _report(f"BIOS with QEMU's IPMI BMC simulator (KCS): QEMU start -> POST {to_post:.1f} s")


def test_publish_is_atomic_and_cached(image, tmp_path):
    """A build into a second output directory reuses the cache and gives identical files."""
    from bastion_app.images.discovery import build_discovery

    other = build_discovery(None, tmp_path / "out", progress=lambda msg: None)
    assert other.cached
    for name in ("vmlinuz", "initrd.img", "manifest.json"):
        assert (tmp_path / "out" / name).read_bytes() == (image.kernel.parent / name).read_bytes()
    manifest = json.loads(other.manifest.read_text())
    assert manifest["inputs_hash"] == other.inputs_hash
    assert manifest["files"]["initrd.img"]["size_bytes"] == other.initrd.stat().st_size
    assert {"virtio_net", "e1000", "nvme", "ahci", "sd_mod"} <= set(manifest["modules"])
    assert not list((tmp_path / "out").glob(".*.tmp"))



def test_initramfs_layout(image, tmp_path):
    """What the kernel unpacks: /init, busybox, device nodes, modules in dependency order."""
    need_binary("cpio")
    import gzip

    raw = gzip.decompress(image.initrd.read_bytes())
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    entries = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()}
    assert entries["init"].startswith("-rwxr-xr-x")
    assert entries["bin/busybox"].startswith("-rwxr-xr-x")
    assert entries["etc/lab/udhcpc.script"].startswith("-rwxr-xr-x")
    assert entries["dev/console"].startswith("crw")
    assert "etc/lab/lib.sh" in entries
    kver = image.kernel_version
    subprocess.run(["cpio", "-idm", "--quiet", "etc/lab/*", f"lib/modules/{kver}/modules.dep"],
                   input=raw, cwd=tmp_path, check=True)
    order = (tmp_path / "etc/lab/modules.load").read_text().split()
    assert order == list(image.modules)
    position = {name: i for i, name in enumerate(order)}
    for line in (tmp_path / f"lib/modules/{kver}/modules.dep").read_text().splitlines():
        module, _, deps = line.partition(":")
        for dep in deps.split():
            assert position[dep.removesuffix(".ko")] < position[module.removesuffix(".ko")], line
        assert f"lib/modules/{kver}/{module}" in entries
    assert position["realtek"] < position["r8169"]  # softdep pre: realtek
    assert position["virtio"] < position["virtio_net"] and position["scsi_mod"] < position["sd_mod"]
    # ipmitool with every library it loads: it runs in the unpacked image alone (chrooted)
    need(os.geteuid() == 0, "chroot needs root")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "opt/lab/bin/*", "lib64/*", "lib/x86_64-linux-gnu/*"],
                   input=raw, cwd=root, check=True)
    version = subprocess.run(["chroot", root, "/opt/lab/bin/ipmitool", "-V"],
                             capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("ipmitool version"), version
    # Nothing in the image forces a serial console (it stalls machines without a UART).
    for path in (tmp_path / "etc/lab").iterdir():
        assert "console=ttyS0" not in path.read_text()

    # Driver selection: PCI drivers only for the devices present, bus-independent ones always.
    def select(*modaliases: str) -> list[str]:
        need_binary("busybox")
        (tmp_path / "pci.modalias").write_text("".join(m + "\n" for m in modaliases))
        lab = tmp_path / "etc/lab"
        out = subprocess.run(["busybox", "awk", "-f", lab / "modules.awk", tmp_path / "pci.modalias",
                              lab / "modules.pci", lab / "modules.plan"], capture_output=True, text=True, check=True)
        picked = out.stdout.split()
        assert picked == [m for m in order if m in picked]  # load order kept
        return picked

    bare = select()
    assert {"virtio_net", "virtio_blk", "sd_mod", "usb_storage", "scsi_mod", "ipmi_devintf", "ipmi_msghandler"} <= set(bare)
    assert "ipmi_si" not in bare  # /init loads it when SMBIOS or ACPI describes a BMC
    assert not {"e1000", "e1000e", "igb", "ixgbe", "i40e", "r8169", "nvme", "ahci", "virtio_pci", "libphy"} & set(bare)
    picked = select(
        "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00",  # 82540EM: e1000
        "pci:v000010ECd00008168sv00001458sd0000E000bc02sc00i00",  # RTL8111: r8169 (+ realtek PHY)
        "pci:v00008086d0000A352sv00001028sd0000085Abc01sc06i01",  # Intel AHCI (by class)
        "pci:v0000144Dd0000A808sv0000144Dsd0000A801bc01sc08i02",  # Samsung NVMe (by class)
        "pci:v00008086d000010FBsv00008086sd00000003bc02sc00i00",  # 82599: ixgbe (+ dca, mdio, ...)
    )
    assert {"e1000", "r8169", "realtek", "libphy", "ahci", "libahci", "libata", "nvme", "nvme_core",
            "ixgbe", "dca", "mdio"} <= set(picked)
    assert not {"e1000e", "igb", "i40e", "tg3", "virtio_pci", "xhci_pci"} & set(picked)


def test_inputs_hash_follows_the_inputs(tmp_path, monkeypatch):
    from bastion_app.images import discovery

    packages = {"kernel": ("linux-image-6.1.0-1-amd64", "6.1.1-1"), "busybox": ("busybox-static", "1:1.35.0-4")}
    base = discovery.inputs_hash(packages)
    assert discovery.inputs_hash(dict(packages)) == base
    assert discovery.inputs_hash({**packages, "kernel": ("linux-image-6.1.0-1-amd64", "6.1.1-2")}) != base
    assert discovery.inputs_hash(packages, discovery.MODULES + ("ice",)) != base
    copy = tmp_path / "discovery"
    shutil.copytree(discovery.SOURCE_DIR, copy)
    monkeypatch.setattr(discovery, "SOURCE_DIR", copy)
    assert discovery.inputs_hash(packages) == base
    with open(copy / "init", "a") as fh:
        fh.write("# changed\n")
    assert discovery.inputs_hash(packages) != base
