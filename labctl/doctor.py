"""`labctl doctor`: is this bastion healthy? Each check passes or fails with a hint.

Checks: the bastion answers and takes the token; `lab-bastion serve` runs on the data directory
(and how it was started: <data>/serve.json, which serve writes at each start); dnsmasq runs (unless
serve was started without it); the DHCP (67), TFTP (69), HTTP and
syslog (5514) ports are bound; the TFTP root holds iPXE, and whether its UEFI binaries are signed
(Debian's are not: UEFI machines must boot with Secure Boot off); the boot artefacts exist; which
address installs are bound to (DHCP lease, neighbour table or first address); and a real
DHCPDISCOVER on the provisioning interface lists every DHCP server that answers (a second DHCP or
PXE server on the segment breaks PXE boots in confusing ways).

Local checks (serve, processes, ports, files, DHCP) describe the machine labctl runs on: run doctor
on the bastion itself, with --data-dir naming its data directory. What doctor cannot check (no data
directory) is listed as not checked, never as passed.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from labcore import bastion_config, validate
from labcore.bastion_files import BOOT_ARTEFACTS, IPXE_FILES, artefact_command
from labctl import errors, output
from labctl.context import Ctx, output_option, pass_ctx

CHECKS = ("bastion", "token", "serve", "dnsmasq", "ports", "tftp", "artefacts", "binding", "dhcp")
LOCAL_CHECKS = ("serve", "dnsmasq", "ports", "tftp", "artefacts", "binding")
DEFAULT_DATA_DIR = "/var/lib/lab-bastion"


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str
    hint: str = ""


# -- local facts ---------------------------------------------------------------------------------
def running(name: str) -> list[int]:
    """PIDs of processes whose command name is ``name``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == name:
                    pids.append(int(d.name))
            except OSError:
                continue
    return sorted(pids)


def bound_ports(proc_net: Path = Path("/proc/net")) -> set[tuple[str, int]]:
    """(proto, port) of every listening TCP socket and bound UDP socket, IPv4 and IPv6."""
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = (proc_net / proto).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 4:
                continue
            port = int(parts[1].rsplit(":", 1)[1], 16)
            if proto.startswith("tcp") and parts[3] != "0A":  # LISTEN
                continue
            found.add((proto[:3], port))
    return found


# -- DHCP probe ----------------------------------------------------------------------------------
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 5: "ACK", 6: "NAK"}


def discover_packet(mac: bytes, xid: int) -> bytes:
    """A DHCPDISCOVER from a PXE client (so that proxy-DHCP servers answer too), broadcast flag set."""
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"", b"", b"", b"",
                       mac.ljust(16, b"\0"), b"", b"")
    vendor = b"PXEClient:Arch:00000:UNDI:002001"
    opts = (b"\x35\x01\x01"  # DHCPDISCOVER
            + b"\x37\x07\x01\x03\x06\x36\x33\x42\x43"  # parameter request list
            + b"\x5d\x02\x00\x00"  # client architecture: x86 BIOS
            + b"\x5e\x03\x01\x02\x01"  # client network interface: UNDI 2.1
            + bytes([60, len(vendor)]) + vendor + b"\xff")
    return head + DHCP_MAGIC + opts


def parse_reply(data: bytes, xid: int) -> dict[str, Any] | None:
    if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid or data[236:240] != DHCP_MAGIC:
        return None
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        code, n = data[i], data[i + 1]
        opts[code] = data[i + 2:i + 2 + n]
        i += 2 + n
    yiaddr = socket.inet_ntoa(data[16:20])
    boot_file = (opts.get(67) or data[108:236].split(b"\0", 1)[0]).decode("ascii", "replace")
    return {
        "type": DHCP_TYPES.get(opts.get(53, b"\0")[0], "?"),
        "server": socket.inet_ntoa(opts[54]) if len(opts.get(54, b"")) == 4 else socket.inet_ntoa(data[20:24]),
        "offered_ip": None if yiaddr == "0.0.0.0" else yiaddr,
        "pxe": opts.get(60, b"").startswith(b"PXEClient") or bool(boot_file),
        "boot_file": boot_file,
    }


def interface_mac(interface: str) -> bytes:
    try:
        text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
    except OSError:
        raise errors.UsageError(f"no network interface {interface!r}", "see `ip -br link`") from None
    return bytes.fromhex(text.replace(":", ""))


def probe_dhcp(interface: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Broadcast one DHCPDISCOVER on ``interface`` (a socket bound to it, port 68) and return every
    answer received within ``timeout`` seconds. Needs root (port 68, SO_BINDTODEVICE). Only a
    DISCOVER is sent: no address is requested or taken."""
    xid = random.getrandbits(32)
    mac = interface_mac(interface)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
            s.bind(("", 68))
        except PermissionError:
            raise errors.LabctlError("the DHCP probe needs root (it binds UDP port 68 on the interface)",
                                     "run labctl doctor as root, or skip it with --skip dhcp") from None
        except OSError as exc:
            raise errors.LabctlError(f"cannot bind UDP port 68 on {interface}: {exc.strerror}",
                                     "is a DHCP client holding it? (--skip dhcp skips this check)") from None
        s.sendto(discover_packet(mac, xid), ("255.255.255.255", 67))
        answers: dict[tuple, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data, addr = s.recvfrom(4096)
            reply = parse_reply(data, xid)
            if reply and reply["type"] == "OFFER":
                reply["from"] = addr[0]
                answers[(reply["server"], reply["offered_ip"], reply["boot_file"])] = reply
        return list(answers.values())
    finally:
        s.close()


def pe_signed(path: Path) -> bool:
    """Whether the PE/COFF (EFI) binary at ``path`` carries an Authenticode signature: a non-empty
    Certificate Table (data directory 4 of the optional header). Firmware with Secure Boot on
    loads only signed binaries."""
    data = path.read_bytes()
    try:
        (pe,) = struct.unpack_from("<I", data, 0x3C)
        if data[pe : pe + 4] != b"PE\0\0":
            return False
        opt = pe + 24  # after the signature and the 20-byte COFF header
        (magic,) = struct.unpack_from("<H", data, opt)
        dirs = {0x10B: 96, 0x20B: 112}[magic]  # PE32, PE32+: where the data directories start
        (count,) = struct.unpack_from("<I", data, opt + dirs - 4)
        if count <= 4:
            return False
        _offset, size = struct.unpack_from("<II", data, opt + dirs + 4 * 8)
    except (struct.error, KeyError):
        return False
    return size > 0


#: images/<name> -> the command that puts it there (an OS's installer files: images sync --os NAME)
# -- the checks ----------------------------------------------------------------------------------
def serve_running(data_dir: Path) -> bool | None:
    """Whether a `lab-bastion serve` holds <data>/serve.lock (None: the lock cannot be read)."""
    try:
        fd = os.open(data_dir / "serve.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock taken just now, if any
    return False


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def load_bastion(data_dir: Path, given: bool) -> tuple[bastion_config.Config | None, Check]:
    """The settings to check this host against, and the `serve` check: what serve wrote at its start
    (serve.json), else bastion.yaml; None when ``data_dir`` holds no bastion."""
    how = "--data-dir" if given else f"no --data-dir given and the default {data_dir}"
    if not (data_dir / "token").exists() and not (data_dir / bastion_config.SERVE_STATE_NAME).exists():
        return None, Check("serve", "skip", f"not checked: {how} is not a bastion data directory (no token, no serve.json)",
                           "pass --data-dir DIR, the directory `lab-bastion serve --data-dir` uses (or set LAB_BASTION_DATA_DIR)")
    try:
        state = bastion_config.read_serve_state(data_dir)
    except bastion_config.ConfigError as exc:
        state, problem = None, str(exc)
    else:
        problem = ""
    if state is None:
        try:
            cfg = bastion_config.load(data_dir, detect=True)
        except bastion_config.ConfigError as exc:
            raise errors.UsageError(f"bastion configuration in {data_dir}: {exc}") from None
        detail = problem or f"no {bastion_config.SERVE_STATE_NAME} in {data_dir}: lab-bastion serve has not started since it was upgraded"
        return cfg, Check("serve", "fail" if problem else "warn",
                          detail + "; checking against bastion.yaml, not the flags serve was given",
                          f"restart lab-bastion serve --data-dir {data_dir} (it rewrites {bastion_config.SERVE_STATE_NAME})")
    doc, cfg = state
    how_started = (f"HTTP {cfg.listen}, syslog {cfg.syslog_port}/udp+tcp, dnsmasq {'on' if cfg.dnsmasq else 'off'}, "
                   f"machines use {doc.get('base_url') or cfg.base_url()}")
    running = serve_running(data_dir)
    if running is False:
        return cfg, Check("serve", "fail", f"lab-bastion serve is not running on {data_dir} (last started {_when(doc.get('started_at'))}, "
                          f"pid {doc.get('pid')}, with {how_started})",
                          f"start it: systemctl start lab-bastion, or lab-bastion serve --data-dir {data_dir}")
    status = "pass" if running else "warn"
    detail = f"started {_when(doc.get('started_at'))} (pid {doc.get('pid')}) with {how_started}"
    hint = "" if running else f"cannot read {data_dir / 'serve.lock'} to tell whether serve runs: run doctor as root"
    machines_host = urlsplit(doc.get("base_url") or cfg.base_url()).hostname or ""
    if _loopback(cfg.listen_host) and not _loopback(machines_host):
        status, hint = "warn", (f"serve listens on {cfg.listen_host} only, but machines are told {machines_host}: "
                                f"they cannot reach it; start serve with --listen 0.0.0.0:{cfg.listen_port}")
    return cfg, Check("serve", status, detail, hint)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bastion(obj: Ctx) -> list[Check]:
    c = obj.client
    try:
        health = c.get("/healthz")
    except errors.LabctlError as exc:
        return [Check("bastion", "fail", exc.message, exc.hint or ""),
                Check("token", "skip", "bastion unreachable")]
    out = [Check("bastion", "pass" if health.get("status") == "ok" else "fail",
                 f"{c.base_url} answers (schema {health.get('schema_version')})")]
    if not obj.settings["token"]:
        out.append(Check("token", "fail", "no operator token configured",
                         'labctl config set token "$(lab-bastion token --data-dir DIR)"'))
        return out
    try:
        n = len(c.machines())
        out.append(Check("token", "pass", f"token accepted ({n} machines)"))
    except errors.LabctlError as exc:
        out.append(Check("token", "fail", exc.message, exc.hint or ""))
    return out


def check_local(cfg, http_port: int) -> dict[str, list[Check]]:
    out: dict[str, list[Check]] = {}
    pids = running("dnsmasq")
    if not cfg.dnsmasq:
        out["dnsmasq"] = [Check("dnsmasq", "skip", "dnsmasq is disabled in this bastion's configuration")]
    else:
        out["dnsmasq"] = [Check("dnsmasq", "pass" if pids else "fail",
                                f"running (pid {', '.join(map(str, pids))})" if pids else "no dnsmasq process",
                                "" if pids else f"start the bastion: lab-bastion serve --data-dir {cfg.data_path}")]
    bound = bound_ports()
    wanted = [("udp", 67, "DHCP", cfg.dnsmasq), ("udp", 69, "TFTP", cfg.dnsmasq),
              ("tcp", http_port, "HTTP", True), ("udp", cfg.syslog_port, "syslog", True)]
    out["ports"] = [
        Check(f"port {port}/{proto}", "pass" if (proto, port) in bound else ("fail" if needed else "skip"),
              f"{what} {'bound' if (proto, port) in bound else 'not bound'}",
              "" if (proto, port) in bound or not needed else f"nothing listens on {port}/{proto}: is `lab-bastion serve` running?")
        for proto, port, what, needed in wanted
    ]
    tftp = cfg.data_path / "tftp"
    missing = [n for n in IPXE_FILES if not (tftp / n).is_file()]
    out["tftp"] = [Check("tftp files", "fail" if missing else "pass",
                         f"missing in {tftp}: {', '.join(missing)}" if missing else f"{', '.join(IPXE_FILES)} in {tftp}",
                         "lab-bastion serve fills it from Debian's ipxe package (apt-get install ipxe)" if missing else "")]
    efi = [n for n in IPXE_FILES if n.endswith(".efi") and (tftp / n).is_file()]
    unsigned = [n for n in efi if not pe_signed(tftp / n)]
    out["tftp"].append(
        Check("secure boot", "skip", "no UEFI iPXE binary to inspect") if not efi else
        Check("secure boot", "warn", f"{', '.join(unsigned)} unsigned: UEFI machines with Secure Boot on will not load them",
              "turn Secure Boot off in the firmware of every UEFI lab machine (docs/installer.md)") if unsigned else
        Check("secure boot", "pass", f"{', '.join(efi)} signed"))
    img = cfg.images_path
    checks = []
    for name, files in BOOT_ARTEFACTS.items():
        miss = [f for f in files if not (img / name / f).is_file()]
        status = "pass" if not miss else ("fail" if name == "discovery" else "warn")
        checks.append(Check(f"artefacts {name}", status,
                            f"{img / name}: " + (f"missing {', '.join(miss)}" if miss else "present"),
                            "" if not miss else f"{artefact_command(name)} --data-dir {cfg.data_path}"))
    out["artefacts"] = checks
    name, how = bastion_config.install_binding(cfg)
    out["binding"] = [Check("install binding", "warn" if name == "first address" else "pass", f"{name}: {how}",
                            "run dnsmasq on the provisioning segment (dhcp_mode full binds to its leases)"
                            if name == "first address" else "")]
    return out


def check_dhcp(cfg, interface: str | None, timeout: float) -> list[Check]:
    iface = interface or (cfg.interface if cfg else "")
    if not iface:
        return [Check("dhcp", "skip", "not checked: no provisioning interface known", "pass --interface IFACE")]
    try:
        answers = probe_dhcp(iface, timeout)
    except errors.LabctlError as exc:
        return [Check("dhcp", "fail", exc.message, exc.hint or "")]
    mine = {cfg.server_ip} if cfg and cfg.server_ip else set()  # this bastion's own address
    ours = [a for a in answers if a["server"] in mine or a["from"] in mine]
    others = [a for a in answers if a not in ours]
    listing = "; ".join(f"{a['server']} offers {a['offered_ip'] or 'no address (proxy)'}"
                        + (f", boot {a['boot_file']}" if a["boot_file"] else "") for a in answers) or "nobody answered"
    if cfg is None:  # no bastion configuration: which answer is ours is unknown; list them
        servers = {a["server"] for a in answers if a["pxe"]}
        status = "fail" if len(servers) > 1 else "pass"
        return [Check("dhcp", status, f"on {iface}: {listing}",
                      "several PXE servers answer: machines may boot from the wrong one" if status == "fail" else "")]
    rogue_pxe = [a for a in others if a["pxe"]]
    if rogue_pxe:
        return [Check("dhcp", "fail", f"another PXE server answers on {iface}: {listing}",
                      "PXE clients may boot from it: switch it off on this segment")]
    if cfg.dhcp_mode == "full" and [a for a in others if a["offered_ip"]]:
        return [Check("dhcp", "fail", f"another DHCP server offers addresses on {iface}: {listing}",
                      "with dhcp_mode full this bastion must be the only DHCP server; use dhcp_mode proxy instead")]
    if cfg.dhcp_mode == "proxy" and not any(a["offered_ip"] for a in answers):
        return [Check("dhcp", "fail", f"no DHCP server offers addresses on {iface}: {listing}",
                      "proxy-DHCP needs the LAN's DHCP server; without one use dhcp_mode full")]
    return [Check("dhcp", "pass", f"on {iface}: {listing}")]


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LAB_BASTION_DATA_DIR",
              help=f"The bastion's data directory (env LAB_BASTION_DATA_DIR; default {DEFAULT_DATA_DIR} if it holds a bastion).")
@click.option("--interface", metavar="IFACE", help="Provisioning interface for the DHCP probe (default: the bastion's).")
@click.option("--only", "only", multiple=True, type=click.Choice(CHECKS), help="Run only these checks (repeatable).")
@click.option("--skip", "skip", multiple=True, type=click.Choice(CHECKS), help="Skip these checks (repeatable).")
@click.option("--dhcp-timeout", type=click.FloatRange(0.2, 60), default=5.0, show_default=True, metavar="SECONDS",
              help="How long to listen for DHCP answers (servers that ping-check an address answer after ~3 s).")
@output_option
@pass_ctx
def doctor(obj: Ctx, data_dir: Path | None, interface, only, skip, dhcp_timeout) -> None:
    """Check the bastion and this host; exit 8 if any check fails.

    Run it on the bastion host: the local checks follow how `lab-bastion serve` was started
    (<data>/serve.json). What cannot be checked is listed as not checked, never as passed."""
    if interface:
        try:
            validate.interface_name(interface)
        except validate.ValidationError as exc:
            raise errors.UsageError(f"invalid --interface: {exc.message}") from None
    selected = [c for c in (only or CHECKS) if c not in skip]
    results: list[Check] = []
    if {"bastion", "token"} & set(selected):
        results += [c for c in check_bastion(obj) if c.name in selected]
    local = [c for c in LOCAL_CHECKS if c in selected]
    cfg = None
    if local or "dhcp" in selected:
        cfg, serve = load_bastion(data_dir or Path(DEFAULT_DATA_DIR), given=data_dir is not None)
        if "serve" in local:
            results.append(serve)
        if cfg is None:
            results += [Check(c, "skip", "not checked: no bastion data directory", serve.hint)
                        for c in local if c != "serve"]
        else:
            from_serve = cfg.serve_state_path.exists()
            url = obj.settings["bastionUrl"]
            http_port = cfg.listen_port if from_serve else (urlsplit(url).port or (443 if url.startswith("https") else 80))
            found = check_local(cfg, http_port)
            for c in local:
                results += found.get(c, [])
    if "dhcp" in selected:
        results += check_dhcp(cfg, interface, dhcp_timeout)
    not_checked = [c.name for c in results if c.status == "skip" and c.detail.startswith("not checked")]
    doc = {"checks": [asdict(c) for c in results], "not_checked": not_checked}
    output.emit(doc, obj.output, lambda: _print(results, not_checked))
    failed = [c.name for c in results if c.status == "fail"]
    if failed:
        raise errors.ChecksFailed(f"{len(failed)} check(s) failed: {', '.join(failed)}")


def _print(results: list[Check], not_checked: list[str]) -> None:
    con = output.console()
    marks = {"pass": "[green]PASS[/]", "warn": "[yellow]WARN[/]", "fail": "[red]FAIL[/]", "skip": "[dim]SKIP[/]"}
    for c in results:
        con.print(f"{marks[c.status]}  {c.name}: ", end="")
        con.print(c.detail, markup=False, highlight=False)
        if c.hint and (c.status in ("fail", "warn") or c.name == "serve"):
            con.print(f"      hint: {c.hint}", markup=False, highlight=False)
    counts = {k: sum(c.status == k for c in results) for k in ("pass", "warn", "fail", "skip")}
    summary = f"{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed, {counts['skip']} skipped"
    if not_checked:
        summary += f"; NOT checked: {', '.join(not_checked)}"
    con.print(summary, markup=False, highlight=False)
