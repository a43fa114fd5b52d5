"""API request and response schemas (pydantic). The OpenAPI document is generated from these.

Field validators call :mod:`labcore.validate`, so the API, labctl and tests share one set of rules.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    StringConstraints,
    model_serializer,
    model_validator,
)

from labcore import domain
from labcore import validate as v
from labcore.lifecycle import STORED_STATES

# The patterns are published in the JSON schema only (pydantic's own regex engine has no
# look-arounds); the AfterValidator applies the very same pattern with Python's re.
Mac = Annotated[str, AfterValidator(v.mac), Field(description="MAC address (aa:bb:cc:dd:ee:ff, aa-bb-.., aabbccddeeff or aabb.ccdd.eeff); normalised to lowercase colon form",
                                                  examples=["52:54:00:12:34:56"], json_schema_extra={"pattern": v.MAC_PATTERN})]
Hostname = Annotated[str, AfterValidator(v.hostname), Field(description="RFC 1123 host name", examples=["node1"],
                                                            json_schema_extra={"pattern": v.HOSTNAME_PATTERN})]
# Literal[tuple] is the Literal of its items: the names come from the domain's tables
Role = Literal[domain.ROLE_NAMES]
OsName = Literal[domain.OS_NAMES]
DebugMode = Literal[domain.DEBUG_MODES]
StoredState = Literal[tuple(s.value for s in STORED_STATES)]
Disk = Annotated[str, AfterValidator(v.disk), Field(description="'' = auto-detect (NVMe first), else /dev/...",
                                                    json_schema_extra={"pattern": v.DISK_PATTERN})]
SshKey = Annotated[str, AfterValidator(v.ssh_key), Field(max_length=v.MAX_SSH_KEY_LEN, json_schema_extra={"pattern": v.SSH_KEY_PATTERN})]
Token = Annotated[str, AfterValidator(v.token), Field(description="the install's own token, from its boot script",
                                                      json_schema_extra={"pattern": v.TOKEN_PATTERN})]
Stage = Annotated[str, AfterValidator(v.stage), Field(examples=["partitioning", "packages", "post-install", "complete", "failed"],
                                                      json_schema_extra={"pattern": v.STAGE_PATTERN})]


def _integral(value):
    """JSON Schema counts 5.0 as an integer; so do we (but never true/false or "5")."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(ge: int | None = None, le: int | None = None):  # noqa: N802 - a type factory
    """An integer field; the bounds come before the before-validator so that they are published
    in the JSON schema as minimum/maximum."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]
# Free text shown to people, never templated: bounded and free of control characters.
Text = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
Message = Annotated[str, StringConstraints(max_length=2048, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]


class Strict(BaseModel):
    # strict: JSON types are not coerced (false is not 0, "5" is not 5)
    model_config = ConfigDict(extra="forbid", str_max_length=20000, strict=True)


# -- what a machine reports: known fields strict, unknown ones kept (bounded) ------------------------
#: a newer discovery image may send fields this bastion does not know: they are kept (stored with the
#: hardware, shown by the API, never templated into anything) if they fit these bounds, else dropped
MAX_UNKNOWN_FIELDS = 32
MAX_UNKNOWN_BYTES = 4096  # one unknown field's value, as compact JSON
MAX_UNKNOWN_DEPTH = 4
_UNKNOWN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON of bounded depth whose strings (keys too) hold no control character."""
    if depth > MAX_UNKNOWN_DEPTH:
        return False
    if isinstance(value, str):
        return not _CONTROL.search(value)
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float)


class Reported(Strict):
    """A part of a machine's report. Known fields are validated strictly; unknown ones are kept
    when their name is a plain identifier, their value plain JSON within the bounds above and there
    are at most MAX_UNKNOWN_FIELDS of them; others are dropped and named by :func:`dropped_fields`."""

    model_config = ConfigDict(extra="allow")
    _dropped: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _bound_unknown_fields(self):
        extra = self.__pydantic_extra__ or {}
        dropped = []
        for i, (name, value) in enumerate(list(extra.items())):
            try:
                size = len(json.dumps(value, separators=(",", ":")))
            except (TypeError, ValueError):
                size = MAX_UNKNOWN_BYTES + 1
            if (i >= MAX_UNKNOWN_FIELDS or not _UNKNOWN_NAME.fullmatch(name) or size > MAX_UNKNOWN_BYTES
                    or not _plain(value)):
                dropped.append(name)
                del extra[name]
        self._dropped = dropped
        return self


def dropped_fields(report: BaseModel, prefix: str = "") -> list[str]:
    """The unknown fields dropped from a report (dotted paths, names cut to 64 characters)."""
    out = [prefix + _CONTROL.sub("?", n[:64]) for n in getattr(report, "_dropped", None) or []]
    for name in type(report).model_fields:
        value = getattr(report, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, Reported):
                out += dropped_fields(item, f"{prefix}{name}{f'[{i}]' if isinstance(value, list) else ''}.")
    return out


class Cpu(Reported):
    model: Text = ""
    cores: Int(0, 65536) = 0
    threads: Int(0, 65536) = 0
    arch: Text = ""


class DiskInfo(Reported):
    name: Text
    size_bytes: Int(0, 2**63 - 1) = 0
    model: Text = ""
    serial: Text = ""
    rotational: bool = False
    removable: bool = False
    transport: Text = "unknown"


class Nic(Reported):
    name: Text
    mac: Mac
    driver: Text = ""
    link: bool = False
    speed_mbps: Int(-1, 10_000_000) | None = None


class Dmi(Reported):
    vendor: Text = ""
    product: Text = ""
    serial: Text = ""
    uuid: Text = ""
    bios_vendor: Text = ""
    bios_version: Text = ""


def _bmc_address(driver: str):
    return lambda a: v.bmc_address(a, driver) and a


IpmiAddress = Annotated[str, AfterValidator(_bmc_address("ipmi")),
                        Field(description="HOST[:PORT]: an IPv4 address or a host name (port 623 by default)",
                              max_length=v.BMC_ADDRESS_MAX, examples=["10.0.1.22"],
                              json_schema_extra={"pattern": v.IPMI_ADDRESS_PATTERN})]
RedfishAddress = Annotated[str, AfterValidator(_bmc_address("redfish")),
                           Field(description="[https://|http://]HOST[:PORT]: an IPv4 address or a host name (https by default)",
                                 max_length=v.BMC_ADDRESS_MAX, examples=["https://10.0.1.21"],
                                 json_schema_extra={"pattern": v.REDFISH_ADDRESS_PATTERN})]
BmcSystemId = Annotated[str, AfterValidator(v.bmc_system_id), Field(json_schema_extra={"pattern": v.BMC_SYSTEM_ID_PATTERN})]
BmcUsername = Annotated[str, AfterValidator(v.bmc_username), Field(json_schema_extra={"pattern": v.BMC_USERNAME_PATTERN})]
BmcPassword = Annotated[str, AfterValidator(v.bmc_password), Field(json_schema_extra={"pattern": v.BMC_PASSWORD_PATTERN})]


class RedfishBmc(Strict):
    """A Redfish BMC. The credentials are sealed at rest and never shown again."""

    driver: Literal["redfish"]
    address: RedfishAddress
    username: BmcUsername
    password: BmcPassword
    system_id: BmcSystemId | None = Field(None, description="/redfish/v1/Systems/<id> (default: the BMC's only system)")
    verify_tls: bool = Field(True, description="over https: check the BMC's certificate")


class IpmiBmc(Strict):
    """An IPMI (RMCP+, IPMI 2.0 LAN) BMC. The credentials are sealed at rest and never shown again."""

    driver: Literal["ipmi"]
    address: IpmiAddress
    username: BmcUsername
    password: BmcPassword


BmcSpec = Annotated[RedfishBmc | IpmiBmc, Field(discriminator="driver")]


class BmcRequest(RootModel[BmcSpec]):
    """A machine's BMC, Redfish or IPMI (by ``driver``)."""


class BmcHint(Reported):
    """What the discovery environment saw of a BMC: an IPMI device (/dev/ipmi0 or SMBIOS type 38),
    and its LAN address when it could read one."""

    ipmi: bool = False
    address: IpmiAddress | None = None


class Hardware(Reported):
    cpu: Cpu = Field(default_factory=Cpu)
    memory_mb: Int(0, 2**40) = 0
    disks: list[DiskInfo] = Field(default_factory=list, max_length=256)
    nics: list[Nic] = Field(default_factory=list, max_length=256)
    dmi: Dmi = Field(default_factory=Dmi)
    firmware: Literal["bios", "uefi", "unknown"] = "unknown"
    bmc: BmcHint | None = None

    @model_serializer(mode="wrap")
    def _without_absent_bmc(self, handler):
        out = handler(self)
        if isinstance(out, dict) and out.get("bmc") is None:
            out.pop("bmc", None)  # only a machine that saw a BMC carries the field
        return out


class DiscoverRequest(Reported):
    mac: Mac
    hardware: Hardware = Field(default_factory=Hardware)

    def stored_hardware(self) -> dict[str, Any]:
        """What the bastion stores: the hardware, and the report's own unknown fields under
        ``report`` (a newer discovery image may describe itself there)."""
        hw = self.hardware.model_dump()
        if self.model_extra:
            hw["report"] = dict(self.model_extra)
        return hw


class InstallRequest(Strict):
    mac: Mac
    hostname: Hostname
    role: Role
    os: OsName
    disk: Disk = ""
    ssh_keys: list[SshKey] = Field(default_factory=list, max_length=v.MAX_SSH_KEYS)
    bmc: BmcSpec | None = Field(None, description="the machine's BMC, recorded with the install (see /api/machines/{mac}/bmc)")


class ReprovisionRequest(Strict):
    """Optional changes for the reinstall; what is left out keeps its previous value."""

    hostname: Hostname | None = None
    role: Role | None = None
    os: OsName | None = None
    disk: Disk | None = None
    ssh_keys: list[SshKey] | None = Field(None, max_length=v.MAX_SSH_KEYS)
    reason: Text = ""


class ProgressRequest(Strict):
    mac: Mac
    token: Token
    stage: Stage
    percent: Int(0, 100) | None = None
    message: Message = ""


class InstallIdentity(Strict):
    """An install's own credentials (the MAC and its install token), e.g. for POST /api/agent-join."""
    mac: Mac
    token: Token


class LogRequest(Strict):
    mac: Mac
    token: Token
    lines: list[Message] = Field(default_factory=list, max_length=1000)


class DebugRequest(Strict):
    mac: Mac
    mode: DebugMode = "rescue"


class ReasonRequest(Strict):
    reason: Text = ""


PowerAction = Literal["on", "off", "cycle"]
BootDevice = Literal["network", "disk"]


class PowerRequest(Strict):
    """A power action through the machine's BMC; ``boot`` first sets the next boot device
    (once, unless ``persistent``)."""

    action: PowerAction
    boot: BootDevice | None = None
    persistent: bool = False


class PowerBatchRequest(Strict):
    """Several machines' power through their BMCs, run by the bastion (POST /api/power): at most
    ``max_parallel`` BMC calls at once, two starts at least ``stagger`` seconds apart."""

    macs: list[Annotated[Mac, Field(max_length=17)]] = Field(min_length=1, max_length=1000)
    action: Literal["status", "on", "off", "cycle"]
    boot: BootDevice | None = None
    persistent: bool = False
    max_parallel: Int(1, 100) = 10
    stagger: Annotated[float, Field(ge=0, le=60)] = 0.0


# -- responses (documented in the OpenAPI document; tests check answers against them) -----------
def api_time(ts: float) -> str:
    """Epoch seconds as every answer shows a time: ISO 8601 in UTC with a Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(Loose):
    error: str
    detail: object | None = None


class MachineView(Loose):
    mac: str
    state: StoredState
    hostname: str | None
    role: str | None
    os: str | None
    disk: str
    ssh_keys: list[str]
    ip: str | None
    hardware: dict
    stage: str | None
    percent: int | None
    message: str | None
    failure: str | None
    stalled: bool
    debug: str | None
    created_at: str
    updated_at: str
    state_changed_at: str
    last_seen_at: str | None
    install_started_at: str | None
    last_progress_at: str | None
    installed_at: str | None


class EventView(Loose):
    id: int
    mac: str
    ts: str
    actor: str
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str
    data: dict


class BmcView(Loose):
    """A machine's BMC as the API shows it: never its credentials."""

    mac: str
    driver: str
    address: str | None
    system_id: str | None
    verify_tls: bool
    credentials: bool = Field(description="whether credentials are stored (they are never shown)")
    source: Literal["operator", "discovery"]
    updated_at: str


class PowerReply(Loose):
    mac: str
    driver: str
    action: Literal["status", "on", "off", "cycle"]
    power: Literal["on", "off", "unknown"]
    changed: bool
    boot: str | None = None


class MachineList(Loose):
    machines: list[MachineView]
    #: the cursor of the next page (GET /api/machines?cursor=), None on the last page
    next: str | None = None


class MachineDetail(MachineView):
    events: list[EventView]


class EventList(Loose):
    events: list[EventView]


class StateReply(Loose):
    mac: str
    state: str
