"""A bastion's configuration: one validated model (:class:`Config`) and its loading order.

Defaults, then ``bastion.yaml`` in the data directory, then environment variables
(``LAB_BASTION_<KEY>``), then command-line flags; the result is validated once, here: types (strings
from YAML or the environment are accepted: ``"8"`` for a number, ``yes``/``off`` for a switch),
bounds, choices, formats and the rules that tie settings together. Network settings left empty are
then auto-detected from the host (the interface with the default route, its address, subnet and
gateway): a separate step, after validation.

What needs the live interface address (is the DHCP range inside its subnet?) is checked where the
address is read: :mod:`bastion_app.dnsmasq`. Every error names the setting and what to change.

The bastion (``lab-bastion``, its gunicorn workers, dnsmasq's generator) and ``labctl doctor``,
which reads a bastion's settings on its host, share this module.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from labcore import validate as v
from labcore.yamlfile import YamlFileError, read_mapping

ENV_PREFIX = "LAB_BASTION_"
DATA_DIR_ENV = "LAB_BASTION_DATA_DIR"
CONFIG_NAME = "bastion.yaml"
#: what `lab-bastion serve` writes at start: the settings it really runs with (labctl doctor reads it)
SERVE_STATE_NAME = "serve.json"


class ConfigError(Exception):
    pass


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (``[::1]:8080`` for IPv6; an empty host means every address) -> (host, port)."""
    m = re.fullmatch(r"\[?([0-9A-Za-z.:-]*?)\]?:(\d{1,5})", listen or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"listen must be HOST:PORT with a port of 1-65535, not {listen!r}")
    return m.group(1) or "0.0.0.0", int(m.group(2))


# -- field types: each check raises ValueError with what is wrong (the setting's name is added) ----
_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
#: an http(s) URL of host[:port][/path] whose characters are safe in a boot script or a DHCP option
URL = re.compile(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/-]*)?")


def _switch(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    try:
        return _BOOL[str(raw).strip().lower()]
    except KeyError:
        raise ValueError(f"invalid value {raw!r}: use true or false (yes/no, on/off, 1/0)") from None


def _mapping(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"invalid value {raw!r}: expected a JSON object") from None
    return raw


def _listen(value: str) -> str:
    try:
        split_listen(value)
    except ConfigError:
        raise ValueError(f"must be HOST:PORT with a port of 1-65535 (e.g. 0.0.0.0:8080), not {value!r}") from None
    return value


def _parses_as(parse, what: str):
    """A check for an optional setting: '' or a value that ``parse`` accepts."""
    def check(value: str) -> str:
        if value:
            try:
                parse(value)
            except ValueError:
                raise ValueError(f"{value!r} is not {what}") from None
        return value
    return check


_ip = _parses_as(ipaddress.ip_address, "an IP address")
_subnet = _parses_as(lambda text: ipaddress.ip_network(text, strict=False), "a network (e.g. 10.0.0.0/24)")


def dhcp_range(value: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """START,END -> the two addresses (ValueError says what is wrong)."""
    parts = value.split(",")
    if len(parts) != 2:
        raise ValueError(f"must be START,END (two IPv4 addresses), not {value!r}")
    try:
        start, end = (ipaddress.IPv4Address(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"{value!r} is not START,END of two IPv4 addresses (e.g. 10.0.0.100,10.0.0.199)") from None
    if end < start:
        raise ValueError(f"{start} comes after {end}: give the lower address first")
    return start, end


def _range(value: str) -> str:
    if value:
        dhcp_range(value)
    return value


def _interface(value: str) -> str:
    if value:
        try:
            v.interface_name(value)
        except v.ValidationError as exc:
            raise ValueError(exc.message) from None
    return value


def _public_url(value: str) -> str:
    if value and not URL.fullmatch(value):
        raise ValueError(f"{value!r} is not an http(s) URL of host[:port][/path]")
    return value


def _access_log(value: str) -> str:
    if value and value != "-" and not (value.startswith("/") and value.isprintable()):
        raise ValueError(f"{value!r}: use '' (no access log), '-' (standard output) or an absolute file path")
    return value


_KERNEL_ARG = re.compile(r"[A-Za-z0-9._:/=,+-]{1,128}")


def valid_kernel_args(value: str) -> str:
    """Kernel arguments as the bastion passes them on (the installers check them again with this)."""
    words = value.split()
    if len(value) > 256 or not all(_KERNEL_ARG.fullmatch(w) for w in words):
        raise ValueError(f"{value!r}: kernel arguments are words of letters, digits and . _ : / = , + - "
                         "(at most 256 characters), e.g. console=ttyS1,115200")
    return " ".join(words)


Switch = Annotated[bool, BeforeValidator(_switch)]
Port = Annotated[int, Field(ge=1, le=65535)]
AtLeastOne = Annotated[int, Field(ge=1)]


def _in_data_dir(name: str) -> property:
    return property(lambda cfg: cfg.data_path / name, doc=f"<data_dir>/{name}")


class Config(BaseModel):
    """The bastion's settings (``lab-bastion config`` prints them). Changing an attribute after
    loading is not validated: call :func:`validate` on a changed configuration."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    data_dir: str = ""
    listen: Annotated[str, AfterValidator(_listen)] = "0.0.0.0:8080"
    #: the URL machines use to reach this bastion; '' = http://<server_ip>:<listen port>
    public_url: Annotated[str, AfterValidator(_public_url)] = ""
    #: gunicorn worker processes and threads per worker
    workers: AtLeastOne = 4
    threads: AtLeastOne = 16
    syslog_port: Port = 5514
    interface: Annotated[str, AfterValidator(_interface)] = ""
    server_ip: Annotated[str, AfterValidator(_ip)] = ""
    subnet: Annotated[str, AfterValidator(_subnet)] = ""
    gateway: Annotated[str, AfterValidator(_ip)] = ""
    dhcp_mode: Literal["proxy", "full"] = "proxy"
    #: START,END of the addresses handed out in full mode
    dhcp_range: Annotated[str, AfterValidator(_range)] = ""
    dnsmasq: Switch = True
    #: seconds without progress before an install is marked stalled (failed, reason stalled)
    stall_timeout: AtLeastOne = 3600
    #: install log lines kept per machine in logs.db (older ones are trimmed)
    log_lines: Annotated[int, Field(ge=10)] = 20000
    #: concurrent log followers (SSE) per gunicorn worker; each holds one extra thread
    followers: AtLeastOne = 128
    #: SQLite synchronous mode: FULL (an acknowledged change survives power loss) or NORMAL
    db_synchronous: Annotated[Literal["FULL", "NORMAL", "EXTRA"],
                              BeforeValidator(lambda s: s.upper() if isinstance(s, str) else s)] = "FULL"
    max_body_bytes: AtLeastOne = 1024 * 1024
    #: per client host and worker: 4xx answers allowed per second (and at once) before 429s
    error_rate: AtLeastOne = 5
    error_burst: AtLeastOne = 100
    #: per worker, all hosts together: once spent, hosts that made a mistake lately get 429s
    error_total_rate: AtLeastOne = 50
    error_total_burst: AtLeastOne = 200
    #: per client host and worker: new machines (discovery reports of unknown MACs) per second, and at once
    discover_rate: AtLeastOne = 2
    discover_burst: AtLeastOne = 50
    #: machines the store keeps at most (new discoveries beyond are refused with 503)
    max_machines: AtLeastOne = 10000
    #: bytes of one machine's hardware report (JSON) and of all of them
    max_hardware_bytes: AtLeastOne = 64 * 1024
    max_hardware_total: AtLeastOne = 64 * 1024 * 1024
    #: discovery environment: 'image' (lab-bastion images build-discovery) or 'kickstart'
    discovery: Literal["image", "kickstart"] = "image"
    #: extra kernel arguments for the environments the bastion boots (discovery, the installers),
    #: e.g. console=ttyS1,115200 where machines have a serial console (IPMI SOL). None by default:
    #: console=ttyS0 on hardware without that UART stalls every boot step
    kernel_args: Annotated[str, AfterValidator(valid_kernel_args)] = ""
    #: what discovery does when done: poweroff | reboot
    discovery_action: Literal["poweroff", "reboot"] = "poweroff"
    #: gunicorn's access log: '' none, '-' standard output, or a file
    access_log: Annotated[str, AfterValidator(_access_log)] = ""
    #: gunicorn's log level
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    extra: Annotated[dict[str, Any], BeforeValidator(_mapping)] = Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _full_dhcp_needs_a_range(self) -> Config:
        if self.dhcp_mode == "full" and not self.dhcp_range:
            raise ValueError("dhcp_mode full needs dhcp_range START,END (--dhcp-range START,END), "
                             "the addresses to hand out; or use dhcp_mode proxy")
        return self

    # derived paths: the data directory and what lives in it (docs/bastion.md, "Data directory")
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    db_path = _in_data_dir("state.db")
    token_path = _in_data_dir("token")
    serve_state_path = _in_data_dir(SERVE_STATE_NAME)
    images_path = _in_data_dir("images")
    run_path = _in_data_dir("run")
    #: the identity for the link to labd (lab-bastion join; labcore.enroll)
    link_path = _in_data_dir("link")

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
        return self.model_dump()


SETTINGS: tuple[str, ...] = tuple(Config.model_fields)


def install_binding(cfg: Config) -> tuple[str, str]:
    """Which address an install is bound to with this configuration (bastion_app.binding does
    the binding): (name, explanation), for ``labctl doctor`` and the docs."""
    if cfg.dnsmasq and cfg.dhcp_mode == "full":
        return "dhcp lease", ("installs are bound to the address this bastion's dnsmasq leased to the machine's MAC "
                              "(a machine without a lease: its ARP entry, else the first address that fetched its install script)")
    if cfg.dnsmasq:
        return "neighbour table", ("proxy-DHCP hands out no address: installs are bound to the address whose ARP entry is "
                                   "the machine's MAC (machines on this segment), else to the first address that fetched "
                                   "the install script")
    return "first address", ("no dnsmasq here: installs are bound to the address whose ARP entry is the machine's MAC "
                             "when it is on this segment, else to the first address that fetched the install script")


def _describe(exc: pydantic.ValidationError) -> str:
    """One line per problem, each naming the setting."""
    out = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(p) for p in err["loc"])
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        if kind == "value_error":
            msg = str(ctx["error"])
        elif kind == "literal_error":
            msg = f"must be {ctx['expected'].replace(chr(39), '')}, not {value!r}"
        elif kind == "greater_than_equal":
            msg = f"must be at least {ctx['ge']}, not {value!r}"
        elif kind == "less_than_equal":
            msg = f"must be at most {ctx['le']}, not {value!r}"
        else:  # a wrong type: "many" for a number, a list for a string
            msg = f"invalid value {value!r}: {err['msg'][0].lower()}{err['msg'][1:]}"
        out.append(f"{name}: {msg}" if name else msg)
    return "; ".join(out)


def build(values: dict[str, Any]) -> Config:
    """A validated Config from ``values`` (ConfigError names each bad setting)."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(SETTINGS))})")
    try:
        return Config.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def validate(cfg: Config) -> Config:
    """Check ``cfg`` again (after its attributes were changed); returns the validated copy."""
    return build(cfg.as_dict())


def load(data_dir: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, env=None,
         detect: bool = True) -> Config:
    env = os.environ if env is None else env
    data_dir = str(data_dir or env.get(DATA_DIR_ENV) or "")
    if not data_dir:
        raise ConfigError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
    try:
        values: dict[str, Any] = read_mapping(Path(data_dir) / CONFIG_NAME)
    except YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    for name in SETTINGS:
        key = ENV_PREFIX + name.upper()
        if key in env and name != "data_dir":
            values[name] = env[key]
    for k, val in (overrides or {}).items():
        if val is not None:
            values[k] = val
    values["data_dir"] = data_dir
    cfg = build(values)
    if detect:
        fill_network(cfg)
    return cfg


# -- how `serve` was started -------------------------------------------------------------------
def write_serve_state(cfg: Config, pid: int, started_at: float) -> Path:
    """Record the effective settings of a starting `lab-bastion serve` (file, environment, flags
    and detected network all applied) in <data>/serve.json, atomically, mode 0644: it holds no
    secret (the token has its own file; ``extra`` is left out)."""
    doc = {"pid": pid, "started_at": started_at, "base_url": cfg.base_url(),
           "settings": {k: val for k, val in cfg.as_dict().items() if k != "extra"}}
    path = cfg.serve_state_path
    tmp = path.with_name(f".{path.name}.{pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_serve_state(data_dir: str | os.PathLike) -> tuple[dict[str, Any], Config] | None:
    """What the last `lab-bastion serve` on ``data_dir`` ran with: (the document, its settings as a
    validated Config), or None when no serve has written it. ConfigError if it is unreadable."""
    path = Path(data_dir) / SERVE_STATE_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise ConfigError(f"{path}: not a serve.json written by lab-bastion serve")
    try:
        cfg = build({**doc["settings"], "data_dir": str(data_dir)})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return doc, cfg


# -- network auto-detection ------------------------------------------------------------------
def _ip_json(*args: str) -> list[dict[str, Any]]:
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
