"""The virtual lab: a network namespace with a bridge, `lab-bastion serve` (and its dnsmasq) inside
it, and QEMU machines on tap devices of that bridge. Used by the e2e fixtures and by `make demo`.

Layout of a lab's state directory (``root``)::

    lab.json            what was started: namespace, pids, URLs, machines (read by `down`)
    data/               the bastion's data directory (state.db, token, images/)
    bastion.log         lab-bastion serve (supervisor, gunicorn, dnsmasq) output
    access.log          gunicorn's access log: every request a machine made, with its query string
    machines/<name>/    console.log (serial), qemu.log, monitor.sock, disk images, OVMF vars

Everything runs inside the namespace ``ns``: the bridge ``br0`` (10.77.0.1/24), the taps, the
bastion, dnsmasq and QEMU. The host reaches the bastion only through a loopback forwarder
(``api_url``: 127.0.0.1:PORT -> 10.77.0.1:8080 inside the namespace); machines reach nothing
outside the namespace. Every process is started in its own session and recorded in lab.json, so
`down` (same process or a later one, e.g. `make demo-down`) stops each by pid, kills whatever is
left in the namespace and deletes it.

CLI: ``python -m tests.e2e.lab up|down|status|forward ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
SUBNET = "10.77.0"
BASTION_IP = f"{SUBNET}.1"
BASTION_PORT = 8080
SYSLOG_PORT = 5514
DHCP_RANGE = f"{SUBNET}.100,{SUBNET}.199"
#: the segment's router (second namespace): IPv6 router advertisements; in proxy mode also the LAN's DHCP server
ROUTER_IP = f"{SUBNET}.254"
ROUTER_IP6 = "fd77::fe"
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, marker: str, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``pid`` (only if its command line contains ``marker``, so a
    recycled pid is never touched), then SIGKILL what is left after ``grace`` seconds."""
    if not _alive(pid) or marker not in _cmdline(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------
# machines


@dataclass
class Machine:
    name: str
    mac: str
    firmware: str  # bios | uefi
    cpus: int
    memory_mb: int
    disk_bytes: int
    dir: str
    pxe: bool = True
    disk: str = ""  # path of the disk image (raw)
    iso: str = ""  # a CD-ROM to boot (machines without a PXE ROM)
    tap: str = ""
    pid: int = 0
    started: float = 0.0

    @property
    def console(self) -> Path:
        return Path(self.dir) / "console.log"

    @property
    def monitor(self) -> Path:
        return Path(self.dir) / "monitor.sock"

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return bool(self.pid) and _alive(self.pid)

    def wait_console(self, text: str, timeout: float, since: int = 0) -> float:
        """Wait until ``text`` appears on the serial console after offset ``since``; returns the
        seconds since the machine started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console_text()[since:]:
                return time.monotonic() - self.started
            if not self.running():
                break
            time.sleep(0.2)
        raise LabError(f"{self.name}: {text!r} not on the serial console within {timeout:.0f} s "
                       f"(running: {self.running()})\n--- console tail ---\n{self.console_text()[-2500:]}")

    def hmp(self, command: str) -> str:
        """One QEMU human monitor command (e.g. ``system_reset``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.monitor))
            s.recv(4096)  # banner and prompt
            s.sendall(command.encode() + b"\n")
            time.sleep(0.3)
            return s.recv(65536).decode(errors="replace")

    def reset(self) -> int:
        """Reboot the machine (hardware reset); returns the console offset of the new boot."""
        offset = len(self.console_text())
        self.hmp("system_reset")
        return offset

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid, self.dir, grace=5)


def mbr_marker_disk(path: Path, marker: str, size: int = 64 << 20) -> None:
    """A raw disk whose MBR boot code writes ``marker`` to COM1 (port 0x3f8) and halts: what an
    installed BIOS machine's disk looks like to the test (it proves the firmware booted the disk)."""
    msg = (marker + "\r\n").encode() + b"\0"
    org = 0x7C00
    code = bytearray()
    code += b"\x31\xc0"  # xor ax, ax
    code += b"\x8e\xd8"  # mov ds, ax
    code += b"\xbe" + (org + 21).to_bytes(2, "little")  # mov si, msg
    code += b"\xba\xf8\x03"  # mov dx, 0x3f8
    code += b"\xac"  # .next: lodsb
    code += b"\x84\xc0"  # test al, al
    code += b"\x74\x03"  # jz .halt
    code += b"\xee"  # out dx, al
    code += b"\xeb\xf8"  # jmp .next
    code += b"\xf4"  # .halt: hlt
    code += b"\xeb\xfd"  # jmp .halt
    assert len(code) == 21
    sector = bytearray(512)
    sector[: len(code) + len(msg)] = code + msg
    assert len(code) + len(msg) <= 440, "marker too long for the MBR"
    sector[510:512] = b"\x55\xaa"
    with open(path, "wb") as fh:
        fh.write(sector)
        fh.truncate(size)


def esp_marker_disk(path: Path, marker: str, work: Path, size: int = 64 << 20) -> None:
    """A raw disk with one EFI system partition (MBR type 0xef at 1 MiB, FAT via mtools) whose
    \\EFI\\BOOT\\BOOTX64.EFI is a standalone GRUB that prints ``marker`` and halts."""
    from bastion_app.images.local_boot import grub_standalone

    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "marker.cfg"
    cfg.write_text(f'echo "{marker}"\nsleep 2\nhalt\n')
    efi = work / "BOOTX64.EFI"
    grub_standalone(efi, cfg, modules=["echo", "sleep", "halt"])
    start, sectors = 2048, (size >> 9) - 2048
    with open(path, "wb") as fh:
        fh.truncate(size)
        mbr = bytearray(512)
        entry = bytes([0, 0, 0, 0, 0xEF, 0, 0, 0]) + start.to_bytes(4, "little") + sectors.to_bytes(4, "little")
        mbr[446:462] = entry
        mbr[510:512] = b"\x55\xaa"
        fh.seek(0)
        fh.write(mbr)
    img = f"{path}@@{start * 512}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for cmd in (["mformat", "-i", img, "-F", "-T", str(sectors), "-v", "ESP", "::"],
                ["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"],
                ["mcopy", "-i", img, str(efi), "::/EFI/BOOT/BOOTX64.EFI"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise LabError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


def prepare_images(data: Path, progress=lambda msg: None) -> dict:
    """The bastion's boot artefacts for the lab: the real discovery image, the local-boot GRUB, the
    debian-12 image and the installer environment that deploys it (built once, then cached), and
    stand-ins for the Fedora installer (Debian's kernel and the discovery initramfs: Fedora media
    cannot be had here; the tests check that they are requested, with the install token)."""
    from bastion_app.images.discovery import build_discovery
    from bastion_app.images.installer import build_installer
    from bastion_app.images.local_boot import build_local_boot
    from bastion_app.images.osimage import build_os

    images = Path(data) / "images"
    started = time.monotonic()
    img = build_discovery(None, images / "discovery", progress=progress)
    build_local_boot(images / "local-boot", progress=progress)
    os_image = build_os("debian-12", images, progress=progress)
    installer = build_installer(images, progress=progress)
    stand_in = images / "fedora-43"
    stand_in.mkdir(parents=True, exist_ok=True)
    for src, name in ((img.kernel, "vmlinuz"), (img.initrd, "initrd.img")):
        dest = stand_in / name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return {"discovery_bytes": img.size_bytes, "seconds": time.monotonic() - started,
            "cached": img.cached and os_image.cached and installer["cached"],
            "os_image_bytes": os_image.size_bytes, "installer_bytes": installer["size_bytes"]}


# ------------------------------------------------------------------------------------------------
# the lab


class Lab:
    def __init__(self, root: Path, *, ns: str | None = None, dhcp_mode: str = "full", dnsmasq: bool = True):
        self.root = Path(root)
        self.ns = ns or f"lp{os.getpid()}{secrets.token_hex(2)}"
        self.dhcp_mode = dhcp_mode
        self.dnsmasq = dnsmasq
        self.router_ns = ""
        self.pids: dict[str, int] = {}
        self.machines: dict[str, Machine] = {}
        self.api_url = ""
        self.token = ""
        self.started = 0.0
        self._taps = 0

    # -- paths
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def bastion_log(self) -> Path:
        return self.root / "bastion.log"

    @property
    def machine_url(self) -> str:
        return f"http://{BASTION_IP}:{BASTION_PORT}"

    # -- persistence (so that another process can stop the lab)
    def save(self) -> None:
        doc = {"root": str(self.root), "ns": self.ns, "router_ns": self.router_ns, "dhcp_mode": self.dhcp_mode,
               "pids": self.pids, "api_url": self.api_url, "machine_url": self.machine_url,
               "machines": {n: asdict(m) for n, m in self.machines.items()}, "started": self.started}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, root: Path) -> Lab:
        doc = json.loads((Path(root) / "lab.json").read_text())
        lab = cls(Path(doc["root"]), ns=doc["ns"], dhcp_mode=doc["dhcp_mode"])
        lab.router_ns = doc.get("router_ns", "")
        lab.pids = {k: int(v) for k, v in doc["pids"].items()}
        lab.api_url = doc["api_url"]
        lab.machines = {n: Machine(**m) for n, m in doc["machines"].items()}
        lab.started = doc.get("started", 0.0)
        lab._taps = len(lab.machines)
        tok = lab.data / "token"
        lab.token = tok.read_text().strip() if tok.exists() else ""
        return lab

    def _spawn(self, key: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, cwd=REPO, start_new_session=True)
        self.pids[key] = proc.pid
        self.save()
        return proc

    # -- network
    def _netns(self) -> None:
        sh("ip", "netns", "add", self.ns)
        self.save()
        n = ["ip", "-n", self.ns]
        sh(*n, "link", "set", "lo", "up")
        sh(*n, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        sh(*n, "addr", "add", f"{BASTION_IP}/24", "dev", "br0")
        sh(*n, "link", "set", "br0", "up")

    def _lan_router(self) -> None:
        """The segment's router, in a second namespace joined to the bridge by a veth pair: a plain
        dnsmasq sending IPv6 router advertisements (as a LAN's router does: without any, iPXE
        waits about 13 s for one before it boots) and, in proxy mode, the LAN's own DHCP server
        (addresses only). It is not the bastion's dnsmasq and knows nothing of PXE."""
        self.router_ns = self.ns + "r"
        sh("ip", "netns", "add", self.router_ns)
        self.save()
        sh("ip", "-n", self.ns, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", self.router_ns)
        sh("ip", "-n", self.ns, "link", "set", "lan0", "master", "br0", "up")
        sh("ip", "-n", self.router_ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.router_ns, "addr", "add", f"{ROUTER_IP}/24", "dev", "eth0")
        sh("ip", "-n", self.router_ns, "addr", "add", f"{ROUTER_IP6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", self.router_ns, "link", "set", "eth0", "up")
        argv = ["ip", "netns", "exec", self.router_ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                "--port=0", "--interface=eth0", "--bind-interfaces", "--enable-ra",
                "--dhcp-range=::,constructor:eth0,ra-only", f"--dhcp-leasefile={self.root}/lan-dhcp.leases",
                "--pid-file", "--user=root", "--log-dhcp", "--log-facility=-"]
        if self.dhcp_mode == "proxy":
            argv += [f"--dhcp-range={SUBNET}.50,{SUBNET}.90,255.255.255.0,1h", f"--dhcp-option=3,{ROUTER_IP}"]
        self._spawn("lan-router", argv, self.root / "lan-router.log")

    def tap(self) -> str:
        name = f"tap{self._taps}"
        self._taps += 1
        sh("ip", "-n", self.ns, "tuntap", "add", "dev", name, "mode", "tap")
        sh("ip", "-n", self.ns, "link", "set", name, "master", "br0", "up")
        return name

    # -- bringing it up
    def up(self, *, timeout: float = 60) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the virtual lab needs root (network namespaces, taps)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "machines").mkdir(exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.started = time.time()
        self.save()
        self._netns()
        self._lan_router()
        serve = [sys.executable, "-m", "bastion_app.cli", "serve", "--data-dir", str(self.data),
                 "--listen", f"0.0.0.0:{BASTION_PORT}", "--workers", "2", "--syslog-port", str(SYSLOG_PORT),
                 "--public-url", self.machine_url, "--interface", "br0"]
        if self.dnsmasq:
            serve += ["--dhcp-mode", self.dhcp_mode]
            if self.dhcp_mode == "full":
                serve += ["--dhcp-range", DHCP_RANGE]
        else:
            serve += ["--no-dnsmasq"]
        # the machines' serial ports are the tests' eyes (console.log): the lab's machines have
        # one, so the bastion may ask for it (bastion.yaml kernel_args)
        env = {"LAB_BASTION_ACCESS_LOG": str(self.access_log), "LAB_BASTION_SERVER_IP": BASTION_IP,
               "LAB_BASTION_KERNEL_ARGS": "console=ttyS0,115200",
               "LAB_BASTION_SUBNET": f"{SUBNET}.0/24", "PYTHONPATH": str(REPO)}
        self._bastion_cmd = (["ip", "netns", "exec", self.ns, *serve], env)
        self._spawn("bastion", self._bastion_cmd[0], self.bastion_log, env)
        port = _free_port()
        self._spawn("forward", [sys.executable, "-m", "tests.e2e.lab", "forward", self.ns,
                                f"127.0.0.1:{port}", f"{BASTION_IP}:{BASTION_PORT}"], self.root / "forward.log",
                    {"PYTHONPATH": str(REPO)})
        self.api_url = f"http://127.0.0.1:{port}"
        self.save()
        self._wait_bastion(timeout)
        self.token = (self.data / "token").read_text().strip()
        return self

    def _wait_bastion(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.api_url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if not _alive(self.pids["bastion"]) or time.monotonic() > deadline:
                raise LabError(f"the bastion did not come up:\n{self.bastion_log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def restart_bastion(self, *, timeout: float = 60) -> None:
        """Stop `lab-bastion serve` and start it again with the same arguments (e.g. after
        `lab-bastion join`: the link child starts with the bastion)."""
        stop_pid(self.pids["bastion"], str(self.root), grace=15)
        self._spawn("bastion", self._bastion_cmd[0], self.bastion_log, self._bastion_cmd[1])
        self._wait_bastion(timeout)

    # -- machines
    def machine(self, name: str, *, firmware: str = "bios", mac: str | None = None, cpus: int = 1,
                memory_mb: int = 512, disk_bytes: int = 1 << 30, pxe: bool = True, iso: Path | None = None,
                disk: Path | None = None) -> Machine:
        """Create and start a QEMU machine (TCG) on a new tap of the bridge."""
        mdir = self.root / "machines" / name
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir(parents=True)
        mac = mac or "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        m = Machine(name=name, mac=mac, firmware=firmware, cpus=cpus, memory_mb=memory_mb, disk_bytes=disk_bytes,
                    dir=str(mdir), pxe=pxe, iso=str(iso or ""), tap=self.tap())
        if disk is None:
            disk = mdir / "disk.raw"
            with open(disk, "wb") as fh:
                fh.truncate(disk_bytes)  # sparse: an empty disk, as on a new machine
        m.disk = str(disk)
        m.disk_bytes = Path(disk).stat().st_size
        self.machines[name] = m
        self.start(m)
        return m

    def qemu_argv(self, m: Machine) -> list[str]:
        mdir = Path(m.dir)
        argv = ["qemu-system-x86_64", "-name", m.name, "-accel", "tcg", "-smp", str(m.cpus), "-m", str(m.memory_mb),
                "-display", "none", "-vga", "none", "-serial", f"file:{m.console}",
                "-monitor", f"unix:{m.monitor},server,nowait"]
        if m.firmware == "uefi":
            vars_copy = mdir / "OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            argv += ["-machine", "q35",
                     "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        else:
            # SeaBIOS mirrors the BIOS text console (iPXE's messages) to the serial port: its
            # fw_cfg file etc/sercon-port holds the port as a little-endian integer
            sercon = mdir / "sercon-port"
            sercon.write_bytes((0x3F8).to_bytes(2, "little"))
            # smm=off: SeaBIOS makes its 32-bit calls (the virtio disk driver behind int 13h) through
            # SMM when it can; under TCG every SMM entry is so slow that GRUB takes many minutes to
            # read a kernel and initrd from the disk (measured: stuck over 6 min, and 45 s from
            # power-on to the installed system's login prompt without SMM)
            argv += ["-machine", "pc,smm=off", "-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
        nic = f"virtio-net-pci,netdev=n0,mac={m.mac}"
        nic += ",bootindex=1" if m.pxe else ",romfile="
        argv += ["-netdev", f"tap,id=n0,ifname={m.tap},script=no,downscript=no", "-device", nic,
                 "-drive", f"file={m.disk},if=none,id=d0,format=raw",
                 "-device", f"virtio-blk-pci,drive=d0,serial=LAB-{m.name[:12]},bootindex=2"]
        if m.iso:
            argv += ["-drive", f"file={m.iso},if=none,id=cd0,media=cdrom,readonly=on",
                     "-device", "ide-cd,drive=cd0,bootindex=0"]
        return argv

    def start(self, m: Machine) -> None:
        m.console.unlink(missing_ok=True)
        proc = self._spawn(f"vm-{m.name}", ["ip", "netns", "exec", self.ns, *self.qemu_argv(m)], Path(m.dir) / "qemu.log")
        m.pid, m.started = proc.pid, time.monotonic()
        self.save()
        deadline = time.monotonic() + 10
        while not m.monitor.exists():
            if not _alive(m.pid) or time.monotonic() > deadline:
                raise LabError(f"QEMU for {m.name} did not start:\n{(Path(m.dir) / 'qemu.log').read_text(errors='replace')}")
            time.sleep(0.05)

    def stop_machine(self, m: Machine) -> None:
        m.stop()
        self.pids.pop(f"vm-{m.name}", None)
        self.save()

    # -- talking to the bastion
    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return requests.request(method, self.api_url + path, headers=headers, timeout=kw.pop("timeout", 10), **kw)

    def machine_state(self, mac: str) -> dict | None:
        r = self.api("GET", f"/api/machines/{mac}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def wait_state(self, mac: str, state: str, timeout: float, machine: Machine | None = None) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.machine_state(mac)
            if last and last["state"] == state:
                return last
            time.sleep(0.5)
        tail = f"\n--- console tail ---\n{machine.console_text()[-2500:]}" if machine else ""
        raise LabError(f"{mac} not {state} within {timeout:.0f} s (now: {last and last['state']}){tail}")

    def access_lines(self, contains: str = "", since: int = 0) -> list[str]:
        """Lines of the bastion's access log (from line ``since``) that contain ``contains``."""
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()[since:]
        except OSError:
            return []
        return [ln for ln in lines if contains in ln]

    def access_mark(self) -> int:
        """The current length of the access log, for ``since=``."""
        return len(self.access_lines())

    def wait_access(self, contains: str, timeout: float, machine: Machine | None = None, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.access_lines(contains, since)
            if found:
                return found[-1]
            if machine is not None and not machine.running():
                break
            time.sleep(0.2)
        tail = f"\n--- console tail ---\n{machine.console_text()[-2500:]}" if machine else ""
        raise LabError(f"no request containing {contains!r} within {timeout:.0f} s{tail}")

    def labctl_env(self) -> dict[str, str]:
        """Environment for `labctl` on the host: this lab's bastion (through the forwarder) and
        token, and a labctl home of its own (no ~/.labctl changed)."""
        return {"LABCTL_BASTION_URL": self.api_url, "LABCTL_TOKEN": self.token, "LABCTL_HOME": str(self.root / "labctl")}

    def ssh(self, ip: str, key: Path, command: str, *, user: str = "admin", timeout: float = 60,
            options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """``ssh user@ip command`` from the bastion's network (inside the namespace), key only."""
        return self.ns_exec("ssh", *ssh_options(key), *options, f"{user}@{ip}", command, timeout=timeout)

    def wait_ssh(self, ip: str, key: Path, timeout: float, machine: Machine | None = None) -> float:
        """Wait until ``admin@ip`` answers over SSH; returns the seconds waited."""
        started = time.monotonic()
        last = None
        while time.monotonic() - started < timeout:
            last = self.ssh(ip, key, "true", timeout=30)
            if last.returncode == 0:
                return time.monotonic() - started
            if machine is not None and not machine.running():
                break
            time.sleep(3)
        tail = f"\n--- console tail ---\n{machine.console_text()[-2500:]}" if machine else ""
        raise LabError(f"no SSH on {ip} within {timeout:.0f} s ({last and last.stderr.strip()}){tail}")

    def ns_exec(self, *argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the lab's namespace (where the machines' network is)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, **kw)

    # -- tearing it down
    def down(self) -> None:
        """Stop everything this lab started (also from another process: Lab.load(root).down())."""
        root = str(self.root)
        for key in sorted(self.pids, key=lambda k: (k == "bastion", k)):  # machines first, bastion last
            # every command line names the lab's directory, except the forwarder's (its namespace)
            stop_pid(self.pids[key], self.ns if key == "forward" else root, grace=15 if key == "bastion" else 5)
        for ns in (self.ns, self.router_ns):
            if not ns or sh("ip", "netns", "pids", ns, check=False).returncode != 0:
                continue
            # a backstop: anything still running in our namespaces was started by this lab
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.pids.clear()
        if self.state_file.exists():
            self.save()


def ssh_options(key: Path) -> list[str]:
    """ssh(1) options for a lab machine: this key only, no host key checks (each install makes new
    host keys), short timeouts."""
    return ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# loopback -> namespace forwarder (the host's way in: labctl, the tests)


def forward(ns: str, listen: str, target: str) -> None:
    """Accept on ``listen`` (host namespace) and connect each client to ``target`` inside ``ns``.
    Each connection's outbound socket is made by a thread that has entered the namespace (setns
    changes only the calling thread)."""
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    srv = socket.create_server((lhost, int(lport)))

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle(client: socket.socket) -> None:
        if libc.setns(nsfd, CLONE_NEWNET) != 0:
            client.close()
            return
        try:
            upstream = socket.create_connection((thost, int(tport)), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join()
        client.close()
        upstream.close()

    while True:
        client, _ = srv.accept()
        threading.Thread(target=handle, args=(client,), daemon=True).start()


#: where `make demo` keeps the lab's state (the Makefile's DEMO_DIR default)
DEMO_DIR = Path("/run/lab-platform-demo")
DEMO_MACHINES = (
    {"name": "bios1", "firmware": "bios", "cpus": 2, "memory_mb": 1024, "disk_bytes": 20 << 30},
    {"name": "uefi1", "firmware": "uefi", "cpus": 2, "memory_mb": 1024, "disk_bytes": 16 << 30},
)


def demo(root: Path, timeout: float = 900, install_timeout: float = 1800) -> int:
    """`make demo`: images, the lab, two machines (BIOS and UEFI) discovered, then the BIOS one
    installed with debian-12 and reached over SSH; the lab keeps running."""
    if (root / "lab.json").exists():
        old = Lab.load(root)
        if old.pids:
            print(f"demo: a lab is still running from {root}; stopping it first", flush=True)
        old.down()
    if root.exists():
        shutil.rmtree(root)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    lab = Lab(root)
    try:
        say("demo: building the discovery environment, the local-boot GRUB, the debian-12 image and its "
            "installer (cached after the first run; the first debian-12 build takes several minutes)")
        info = prepare_images(lab.data, progress=say)
        lab.up()
        say(f"demo: bastion up in network namespace {lab.ns} (machines reach it at {lab.machine_url}; "
            f"this host at {lab.api_url})")
        say(f"demo: web console at {lab.api_url}/console/ (log in with the operator token in {lab.data / 'token'})")
        made = [lab.machine(**spec) for spec in DEMO_MACHINES]
        for m in made:
            say(f"demo: powered on {m.name} ({m.firmware.upper()}, {m.cpus} CPUs, {m.memory_mb} MiB, "
                f"{m.disk_bytes >> 30} GiB disk, MAC {m.mac}); serial console: {m.console}")
        started = time.monotonic()
        pending = {m.mac: m for m in made}
        while pending:
            for mac, m in list(pending.items()):
                st = lab.machine_state(mac)
                if st and st["state"] == "discovered":
                    say(f"demo: {m.name} discovered after {time.monotonic() - started:.0f} s")
                    del pending[mac]
            if time.monotonic() - started > timeout:
                raise LabError(f"not discovered within {timeout:.0f} s: {', '.join(m.name for m in pending.values())} "
                               f"(see the serial consoles and {lab.bastion_log})")
            time.sleep(1)
    except BaseException:
        say("demo: failed; stopping the lab")
        lab.down()
        raise
    env_file = root / "env"
    env = {**lab.labctl_env(), "PATH": f"{REPO / '.venv' / 'bin'}:$PATH"}
    env_file.write_text("".join(f'export {k}="{v}"\n' for k, v in env.items()))
    labctl = str(REPO / ".venv" / "bin" / "labctl")
    run_env = {**os.environ, **lab.labctl_env()}

    def show(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([labctl, *args], capture_output=True, text=True, env=run_env)
        say(f"\n$ labctl {' '.join(args)}")
        say((proc.stdout + proc.stderr).rstrip())
        return proc

    show("provision", "list")
    # the main job: a real install of the BIOS machine (debian-12 through the image deploy), then SSH
    bios, uefi = made
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "demo@lab", "-f", str(key)], check=True)
    queued = show("provision", "install", bios.mac, "--hostname", "node1", "--role", "worker", "--os", "debian-12",
                  "--ssh-key", f"{key}.pub")
    if queued.returncode != 0:
        raise LabError("queueing the install failed (see above)")
    lab.start(bios)
    say(f"demo: powered {bios.name} on again: it PXE-boots the installer and writes debian-12 "
        f"(a few minutes under emulation); following its progress:")
    follow = subprocess.run([labctl, "provision", "logs", "-f", bios.mac], env=run_env, timeout=install_timeout)
    got = lab.wait_state(bios.mac, "installed", 60, bios)
    waited = lab.wait_ssh(got["ip"], key, 600, bios)
    say(f"demo: node1 installed ({follow.returncode == 0 and 'logs followed to the end' or 'logs stopped'}) and "
        f"answering SSH {waited:.0f} s after its reboot")
    ssh_cmd = f"ip netns exec {lab.ns} ssh -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null admin@{got['ip']}"
    hello = lab.ssh(got["ip"], key, "hostname; grep PRETTY_NAME /etc/os-release; findmnt -rno TARGET,SOURCE /")
    say(f"\n$ {ssh_cmd} 'hostname; ...'\n{hello.stdout.rstrip()}")
    show("provision", "list")
    say(f"""
The lab keeps running (state: {root}; discovery image {info['discovery_bytes'] / 1e6:.1f} MB,
debian-12 image {info['os_image_bytes'] / 1e6:.0f} MB, installer {info['installer_bytes'] / 1e6:.1f} MB).
Log in to the installed machine (from the lab's network namespace):
    {ssh_cmd}
Watch it in a browser (the web console; the token is in {lab.data / 'token'}):
    {lab.api_url}/console/
Use labctl against the lab:
    . {env_file}
    labctl provision list
Install the UEFI machine too, then power it on again (it powered off after discovery):
    labctl provision install {uefi.mac} --hostname node2 --role infra --os debian-12 --ssh-key {key}.pub
    {sys.executable} -m tests.e2e.lab power-on {root} {uefi.name}
    labctl provision logs -f node2
Fedora and Ubuntu installs stop at a stand-in here (their media cannot be downloaded in this lab):
the machine fetches its install script and installer, and goes no further.
Serial consoles: {bios.console}, {uefi.console}
Stop everything:
    make demo-down{'' if root == DEMO_DIR else f' DEMO_DIR={root}'}
""")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.lab", description="The virtual PXE lab (QEMU machines in a network namespace).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo", help="build images, start the lab with a BIOS and a UEFI machine, wait for discovery")
    p_demo.add_argument("root", type=Path)
    p_down = sub.add_parser("down", help="stop everything a lab started and delete its namespace")
    p_down.add_argument("root", type=Path)
    p_status = sub.add_parser("status", help="print the lab's state file")
    p_status.add_argument("root", type=Path)
    p_on = sub.add_parser("power-on", help="start a lab machine again (after it powered off)")
    p_on.add_argument("root", type=Path)
    p_on.add_argument("name")
    p_fwd = sub.add_parser("forward", help="(internal) loopback -> namespace TCP forwarder")
    p_fwd.add_argument("ns")
    p_fwd.add_argument("listen")
    p_fwd.add_argument("target")
    args = ap.parse_args(argv)
    if args.cmd == "forward":
        forward(args.ns, args.listen, args.target)
        return 0
    try:
        if args.cmd == "demo":
            return demo(args.root)
        if not (args.root / "lab.json").exists():
            print(f"no lab in {args.root} (nothing to do)", file=sys.stderr)
            return 0
        lab = Lab.load(args.root)
        if args.cmd == "status":
            print(lab.state_file.read_text(), end="")
        elif args.cmd == "power-on":
            if args.name not in lab.machines:
                print(f"no machine {args.name!r} (machines: {', '.join(lab.machines)})", file=sys.stderr)
                return 2
            m = lab.machines[args.name]
            if m.running():
                print(f"{m.name} is already running")
            else:
                lab.start(m)
                print(f"{m.name} powered on; serial console: {m.console}")
        else:
            lab.down()
            print(f"lab {lab.ns} stopped ({args.root})")
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
