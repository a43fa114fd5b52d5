"""Bastion configuration: defaults, then `bastion.yaml` in the data directory, then environment
variables (LAB_BASTION_<KEY>), then command-line flags. Network settings left empty are
auto-detected from the host (interface with the default route, its address, subnet, gateway).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "LAB_BASTION_"
DATA_DIR_ENV = "LAB_BASTION_DATA_DIR"
CONFIG_NAME = "bastion.yaml"


class ConfigError(Exception):
    pass


@dataclass
class Config:
    data_dir: str = ""
    listen: str = "0.0.0.0:8080"
    #: the URL machines use to reach this bastion; '' = http://<server_ip>:<listen port>
    public_url: str = ""
    workers: int = 4
    threads: int = 16
    syslog_port: int = 5514
    interface: str = ""
    server_ip: str = ""
    subnet: str = ""
    gateway: str = ""
    dhcp_mode: str = "proxy"  # proxy | full
    dhcp_range: str = ""  # START,END for full mode
    dnsmasq: bool = True
    #: seconds without progress before an install is marked stalled (failed, reason stalled)
    stall_timeout: int = 3600
    #: install log lines kept per machine in logs.db (older ones are trimmed)
    log_lines: int = 20000
    #: concurrent log followers (SSE) per gunicorn worker; each holds one extra thread
    followers: int = 128
    #: SQLite synchronous mode: FULL (an acknowledged change survives power loss) or NORMAL
    db_synchronous: str = "FULL"
    max_body_bytes: int = 1024 * 1024
    #: per client host and worker: 4xx answers allowed per second (and at once) before 429s
    error_rate: int = 5
    error_burst: int = 100
    #: discovery environment: 'image' (lab-bastion images build-discovery) or 'kickstart'
    discovery: str = "image"
    #: what discovery does when done: poweroff | reboot
    discovery_action: str = "poweroff"
    extra: dict[str, Any] = field(default_factory=dict)

    # derived paths
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_path / "state.db"

    @property
    def token_path(self) -> Path:
        return self.data_path / "token"

    @property
    def images_path(self) -> Path:
        return self.data_path / "images"

    @property
    def run_path(self) -> Path:
        return self.data_path / "run"

    @property
    def listen_host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.listen)[1]

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.server_ip or (self.listen_host if self.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        return f"http://{host}:{self.listen_port}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def split_listen(listen: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([0-9A-Za-z.:-]*?)\]?:(\d{1,5})", listen or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"listen must be HOST:PORT, not {listen!r}")
    return m.group(1) or "0.0.0.0", int(m.group(2))


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    try:
        if typ in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            return _BOOL[str(raw).strip().lower()]
        if typ in (int, "int"):
            return int(raw)
        if typ in (dict, "dict[str, Any]"):
            return dict(raw if isinstance(raw, dict) else json.loads(raw))
        return str(raw)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: invalid value {raw!r}") from exc


def load(data_dir: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, env=None, detect: bool = True) -> Config:
    env = os.environ if env is None else env
    data_dir = str(data_dir or env.get(DATA_DIR_ENV) or "")
    if not data_dir:
        raise ConfigError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
    values: dict[str, Any] = {}
    cfg_file = Path(data_dir) / CONFIG_NAME
    if cfg_file.exists():
        try:
            doc = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg_file}: not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{cfg_file}: expected a mapping of settings")
        values.update(doc)
    known = {f.name: f.type for f in fields(Config)}
    for name in known:
        key = ENV_PREFIX + name.upper()
        if key in env and name != "data_dir":
            values[name] = env[key]
    for k, val in (overrides or {}).items():
        if val is not None:
            values[k] = val
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    cfg = Config(data_dir=data_dir, **{k: _coerce(k, v, known[k]) for k, v in values.items() if k != "data_dir"})
    validate(cfg)
    if detect:
        fill_network(cfg)
    return cfg


def validate(cfg: Config) -> None:
    split_listen(cfg.listen)
    if cfg.dhcp_mode not in ("proxy", "full"):
        raise ConfigError(f"dhcp_mode must be proxy or full, not {cfg.dhcp_mode!r}")
    if cfg.dhcp_mode == "full" and cfg.dhcp_range:
        parts = cfg.dhcp_range.split(",")
        if len(parts) != 2:
            raise ConfigError("dhcp_range must be START,END")
        for p in parts:
            _ip(p.strip(), "dhcp_range")
    if cfg.interface and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", cfg.interface):
        raise ConfigError(f"interface: {cfg.interface!r} is not an interface name")
    for name in ("server_ip", "gateway"):
        if getattr(cfg, name):
            _ip(getattr(cfg, name), name)
    if cfg.subnet:
        try:
            ipaddress.ip_network(cfg.subnet, strict=False)
        except ValueError:
            raise ConfigError(f"subnet: {cfg.subnet!r} is not a network (e.g. 10.0.0.0/24)") from None
    if cfg.public_url and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/-]*)?", cfg.public_url):
        raise ConfigError(f"public_url: {cfg.public_url!r} is not an http(s) URL of host[:port][/path]")
    if cfg.error_rate < 1 or cfg.error_burst < 1:
        raise ConfigError("error_rate and error_burst must be at least 1")
    if cfg.workers < 1 or cfg.threads < 1:
        raise ConfigError("workers and threads must be at least 1")
    if cfg.log_lines < 10 or cfg.followers < 1:
        raise ConfigError("log_lines must be at least 10 and followers at least 1")
    if not 0 < cfg.syslog_port < 65536:
        raise ConfigError("syslog_port must be 1-65535")
    if cfg.discovery not in ("image", "kickstart"):
        raise ConfigError("discovery must be image or kickstart")
    if cfg.discovery_action not in ("poweroff", "reboot"):
        raise ConfigError("discovery_action must be poweroff or reboot")
    if cfg.db_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("db_synchronous must be FULL, NORMAL or EXTRA")


def _ip(value: str, name: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an IP address") from None


# -- network auto-detection ------------------------------------------------------------------
def _ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    cmd = ["ip", "-j", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        return json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return []


def detect_network(interface: str = "") -> dict[str, str]:
    """Interface (the default route's, unless given), its IPv4 address, subnet and gateway."""
    result = {"interface": interface, "server_ip": "", "subnet": "", "gateway": ""}
    routes = _ip_json("-4", "route", "show", "default")
    for r in routes:
        if not interface or r.get("dev") == interface:
            result["interface"] = result["interface"] or r.get("dev", "")
            result["gateway"] = r.get("gateway", "")
            break
    if result["interface"]:
        for link in _ip_json("-4", "addr", "show", "dev", result["interface"]):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    result["server_ip"] = a["local"]
                    result["subnet"] = str(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
                    break
    return result


def fill_network(cfg: Config) -> None:
    """Fill the network settings that were not given explicitly."""
    if cfg.server_ip and cfg.subnet and (cfg.interface or not cfg.dnsmasq):
        return
    found = detect_network(cfg.interface)
    for k in ("interface", "server_ip", "subnet", "gateway"):
        if not getattr(cfg, k) and found.get(k):
            setattr(cfg, k, found[k])
