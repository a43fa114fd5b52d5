"""dnsmasq for the provisioning network: its configuration, generated from the bastion's Config,
the TFTP root (iPXE binaries from Debian's `ipxe` package) and its command line. The supervisor
(:func:`bastion_app.supervisor.dnsmasq_child`) runs it; `lab-bastion dnsmasq-config` writes the
same files for a dnsmasq that runs as its own service.

Proxy-DHCP is the default: the LAN keeps its DHCP server, dnsmasq only adds boot information for
PXE clients. Full DHCP (`dhcp_mode: full`, `dhcp_range: START,END`) hands out addresses too.
Firmware PXE gets an iPXE binary by TFTP (BIOS `undionly.kpxe`, UEFI x86-64 `snponly.efi`); iPXE
then gets the HTTP `/dispatch?mac=${netX/mac}` URL. DNS is off (`port=0`).

The settings are validated by the configuration model (labcore.bastion_config), again here before
anything is written (a caller may have changed them); this module adds the checks that need the
live interface address (the DHCP range lies in its subnet and leaves out the bastion's own
address) and checks its own values (paths, user): nothing can add a line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bastion_app.render import render
from labcore import validate as v
from labcore.bastion_config import URL, Config, ConfigError, dhcp_range, validate
from labcore.bastion_files import BIOS_FILE, EFI_FILE, IPXE_FILES

IPXE_DIR = Path("/usr/lib/ipxe")
LEASE_TIME = "12h"
#: the BOOTP file field is 128 bytes including its terminating NUL
MAX_BOOT_FILE = 127

_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class DnsmasqError(ConfigError):
    """The dnsmasq configuration cannot be generated; the message says what to change."""


@dataclass(frozen=True)
class Interface:
    name: str
    address: ipaddress.IPv4Interface

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.address.network


def interface_address(name: str, prefer: str = "") -> Interface:
    """The IPv4 address (with prefix) of interface ``name``; ``prefer`` picks one of several."""
    _interface(name)
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", name],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DnsmasqError(f"cannot read the addresses of interface {name!r}: {exc}") from None
    if out.returncode != 0:
        raise DnsmasqError(f"interface {name!r} does not exist: pass --interface with one that does "
                           f"(see `ip -br addr`)")
    addrs = [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
             for link in json.loads(out.stdout or "[]") for a in link.get("addr_info", [])
             if a.get("family") == "inet"]
    if not addrs:
        raise DnsmasqError(f"interface {name!r} has no IPv4 address: dnsmasq serves the subnet of its "
                           "address; give it one or pass --interface with another interface")
    for a in addrs:
        if str(a.ip) == prefer:
            return Interface(name, a)
    return Interface(name, addrs[0])


def _interface(name: str) -> str:
    try:
        return v.interface_name(name)
    except v.ValidationError as exc:
        raise DnsmasqError(f"interface: {exc.message}") from None


def _check(pattern: re.Pattern, value: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DnsmasqError(f"{what}: {value!r} cannot go into a dnsmasq configuration")
    return value


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value.strip())
    except (ValueError, AttributeError):
        raise DnsmasqError(f"{what}: {value!r} is not an IPv4 address") from None


def dispatch_url(cfg: Config) -> str:
    """The URL iPXE gets as its boot file; iPXE expands ${netX/mac} itself."""
    base = _check(URL, cfg.base_url(), "bastion URL (public_url or server_ip and listen port)")
    url = base + "/dispatch?mac=${netX/mac}"
    if len(url) > MAX_BOOT_FILE:
        raise DnsmasqError(f"the dispatch URL {url!r} is longer than a DHCP boot file name may be "
                           f"({MAX_BOOT_FILE} bytes): use a shorter public_url")
    return url


def render_config(cfg: Config, tftp_root: Path, iface: Interface, *, run_dir: Path | None = None,
                  user: str = "root", log_dhcp: bool = True) -> str:
    """The dnsmasq configuration for ``cfg`` on ``iface`` (whose address decides the subnet)."""
    try:
        cfg = validate(cfg)
    except ConfigError as exc:
        raise DnsmasqError(str(exc)) from None
    run_dir = Path(run_dir or cfg.run_path)
    ctx = {
        "interface": _interface(iface.name),
        "user": _check(_USER, user, "dnsmasq user"),
        "pid_file": _check(_PATH, str(run_dir / "dnsmasq.pid"), "run directory"),
        "lease_file": _check(_PATH, str(run_dir / "dnsmasq.leases"), "run directory"),
        "tftp_root": _check(_PATH, str(tftp_root), "TFTP root"),
        "log_dhcp": bool(log_dhcp),
        "mode": cfg.dhcp_mode,
        "network": str(iface.network.network_address),
        "netmask": str(iface.network.netmask),
        "server_ip": str(iface.address.ip),
        "bios_file": BIOS_FILE,
        "efi_file": EFI_FILE,
        "dispatch_url": dispatch_url(cfg),
        "lease_time": LEASE_TIME,
        "gateway": "",
        "dns": "",
    }
    if cfg.dhcp_mode == "full":  # the model saw START,END in order; the live subnet is checked here
        start, end = dhcp_range(cfg.dhcp_range)
        for ip in (start, end):
            if ip not in iface.network:
                raise DnsmasqError(f"dhcp_range: {ip} is outside {iface.network}, the subnet of "
                                   f"{iface.name} ({iface.address})")
        if start <= iface.address.ip <= end:
            raise DnsmasqError(f"dhcp_range: {start}-{end} contains the bastion's own address {iface.address.ip}")
        ctx.update(range_start=str(start), range_end=str(end))
        if cfg.gateway:
            gw = _ipv4(cfg.gateway, "gateway")
            # the router and resolver machines are told about; a lab network's gateway is usually both
            ctx.update(gateway=str(gw), dns=str(gw))
    return render("dnsmasq/dnsmasq.conf.j2", **ctx)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill_tftp_root(tftp_root: Path, source: Path = IPXE_DIR) -> list[str]:
    """Copy the iPXE binaries into ``tftp_root`` (atomically, only when changed)."""
    tftp_root.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, src_name in IPXE_FILES.items():
        src = source / src_name
        if not src.is_file():
            raise DnsmasqError(f"{src} is missing: install Debian's ipxe package (make deps-system)")
        dest = tftp_root / name
        if dest.is_file() and _digest(dest) == _digest(src):
            continue
        tmp = dest.with_name(f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        tmp.replace(dest)
        copied.append(name)
    return copied


def _owner(path: Path) -> str:
    """dnsmasq drops root privileges to the owner of the data directory, which can read it."""
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except KeyError:
        return "root"


def write_config(cfg: Config, conf: Path, tftp_root: Path | None = None) -> bool:
    """Fill the TFTP root (default <data>/tftp) and write the configuration for ``cfg`` to ``conf``
    (atomically, only when its content changes). True when anything changed."""
    if not cfg.interface:
        raise DnsmasqError("no provisioning interface: set interface in bastion.yaml (lab-bastion serve: "
                           "--interface IFACE, or --no-dnsmasq to run without dnsmasq)")
    iface = interface_address(cfg.interface, prefer=cfg.server_ip)
    tftp_root = tftp_root or cfg.data_path / "tftp"
    copied = fill_tftp_root(tftp_root)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    text = render_config(cfg, tftp_root, iface, user=_owner(cfg.data_path))
    if conf.is_file() and conf.read_text() == text:
        return bool(copied)
    tmp = conf.with_name(conf.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(conf)
    return True


def binary() -> str:
    """The dnsmasq executable."""
    found = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
    if not found:
        raise DnsmasqError("dnsmasq is not installed: install Debian's dnsmasq-base (make deps-system) "
                           "or run with --no-dnsmasq")
    return found


def conf_path(cfg: Config) -> Path:
    """Where `lab-bastion serve` writes the configuration of the dnsmasq it runs."""
    return cfg.run_path / "dnsmasq.conf"


def argv(conf: Path, binary: str = "dnsmasq") -> list[str]:
    return [binary, "--keep-in-foreground", f"--conf-file={conf}"]


def check_config(conf: Path, binary: str = "dnsmasq") -> subprocess.CompletedProcess:
    """`dnsmasq --test` on a written configuration (syntax check)."""
    return subprocess.run([binary, "--test", f"--conf-file={conf}"], capture_output=True, text=True, timeout=30)
