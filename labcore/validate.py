"""Validation of every value that can reach a template, a shell line or a YAML document.

Each validator returns the normalised value or raises :class:`ValidationError`. They are strict on
purpose: nothing they accept can add a line to a kickstart, an iPXE script or a shell command.
"""

from __future__ import annotations

import base64
import re
import secrets

import netaddr

from labcore.domain import OS_NAMES, ROLE_NAMES

MAX_SSH_KEYS = 16
MAX_SSH_KEY_LEN = 16384

# The patterns below are also published in the OpenAPI document (labcore.schemas), so that what a
# client can read from the spec is exactly what the bastion accepts.
_HEX2 = "[0-9A-Fa-f]{2}"
_HEX4 = "[0-9A-Fa-f]{4}"
MAC_PATTERN = (
    rf"^(?:{_HEX2}(?::{_HEX2}){{5}}|{_HEX2}(?:-{_HEX2}){{5}}|[0-9A-Fa-f]{{12}}|{_HEX4}\.{_HEX4}\.{_HEX4})$"
)
_HN_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
# RFC 1123: labels of letters, digits and hyphens; the last label is not all digits (so a host
# name never has the dotted-decimal form of an address).
HOSTNAME_PATTERN = rf"^(?=.{{1,253}}$)(?:{_HN_LABEL}\.)*(?![0-9]+$){_HN_LABEL}$"
DISK_PATTERN = r"^(?:|/dev/(?!.*/\.\.(?:/|$))[A-Za-z0-9_][A-Za-z0-9_.:+@/-]{0,120})$"
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"
STAGE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
# A Linux interface name (at most 15 bytes, no '/', ':' or white space; '.' and '..' are not
# names), kept to characters that are safe in a dnsmasq line, an argv and a /sys path.
INTERFACE_PATTERN = r"^(?!\.{1,2}$)[A-Za-z0-9_.@-]{1,15}$"

_MAC = re.compile(MAC_PATTERN)
_HOSTNAME = re.compile(HOSTNAME_PATTERN)
_DISK = re.compile(DISK_PATTERN)
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _esc(text: str) -> str:
    """Escape for a pattern that must read the same in Python and in ECMA-262 (JSON Schema)."""
    return re.sub(r"([.+*?^$()\[\]{}|\\/])", r"\\\1", text)


def _b64_prefix_pattern(header: bytes) -> str:
    """A regex for base64 text whose decoded bytes start with ``header``: the characters fully
    fixed by the header, then a class for the one character that is only partly fixed."""
    full = len(header) // 3 * 3
    out = _esc(base64.b64encode(header[:full]).decode())
    rest = header[full:]
    if rest:
        chars = sorted({base64.b64encode(rest + bytes([b]) + b"\0")[len(rest)] for b in range(256)})
        fixed = base64.b64encode(rest + b"\0\0")[: len(rest)].decode()
        out += _esc(fixed) + "[" + "".join(_esc(chr(c)) for c in chars) + "]"
    return out


def _ssh_key_pattern() -> str:
    b64 = "[A-Za-z0-9+/]"
    body = rf"(?:{b64}{{4}})*(?:{b64}{{2}}==|{b64}{{3}}=)?"
    alternatives = []
    for t in _SSH_KEY_TYPES:
        header = len(t).to_bytes(4, "big") + t.encode()
        alternatives.append(rf"{_esc(t)} (?={_b64_prefix_pattern(header)}){body}")
    return rf"^(?:{'|'.join(alternatives)})(?: [A-Za-z0-9@._+:=,/-]{{1,200}})?$"


#: An OpenSSH public key line: a known type, base64 key data that starts with that same type, an
#: optional comment of safe characters.
SSH_KEY_PATTERN = _ssh_key_pattern()
_SSH_KEY = re.compile(SSH_KEY_PATTERN)
_TOKEN = re.compile(TOKEN_PATTERN)
_STAGE = re.compile(STAGE_PATTERN)
_INTERFACE = re.compile(INTERFACE_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ValidationError(ValueError):
    """A value was rejected; ``field`` names it for the API's error detail."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def mac(value: object, field: str = "mac") -> str:
    """Normalise a MAC address to lowercase colon form (aa:bb:cc:dd:ee:ff)."""
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise ValidationError(field, "not a MAC address (expected e.g. 52:54:00:12:34:56)")
    try:
        eui = netaddr.EUI(value, version=48)
    except (netaddr.AddrFormatError, TypeError, ValueError):
        raise ValidationError(field, f"not a MAC address: {value!r}") from None
    eui.dialect = netaddr.mac_unix_expanded
    return str(eui).lower()


def hostname(value: object, field: str = "hostname") -> str:
    """An RFC 1123 host name (labels of letters, digits and hyphens), normalised to lowercase."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "a host name is required")
    if not _HOSTNAME.fullmatch(value):
        raise ValidationError(
            field,
            f"{value!r} is not an RFC 1123 host name: at most 253 characters, labels of 1-63 letters, digits "
            "or hyphens, not starting or ending with a hyphen, the last label not all digits",
        )
    return value.lower()


def role(value: object, field: str = "role") -> str:
    if value not in ROLE_NAMES:
        raise ValidationError(field, f"unknown role {value!r} (one of: {', '.join(ROLE_NAMES)})")
    return value  # type: ignore[return-value]


def os_name(value: object, field: str = "os") -> str:
    if value not in OS_NAMES:
        raise ValidationError(field, f"unknown os {value!r} (one of: {', '.join(OS_NAMES)})")
    return value  # type: ignore[return-value]


def disk(value: object, field: str = "disk") -> str:
    """'' means auto-detect; otherwise a /dev/... path of safe characters."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _DISK.fullmatch(value):
        raise ValidationError(
            field, f"{value!r} is not a disk device: use '' (auto-detect) or a path like /dev/nvme0n1"
        )
    return value


def ssh_key(value: object, field: str = "ssh_keys") -> str:
    """One OpenSSH public key line: type, base64 blob whose embedded type matches, optional comment."""
    if not isinstance(value, str):
        raise ValidationError(field, "an SSH public key must be a string")
    if len(value) > MAX_SSH_KEY_LEN:
        raise ValidationError(field, f"SSH public key longer than {MAX_SSH_KEY_LEN} characters")
    if not _SSH_KEY.fullmatch(value):
        raise ValidationError(
            field,
            "not an OpenSSH public key line: 'TYPE BASE64 [comment]' with a known type "
            f"({', '.join(_SSH_KEY_TYPES)}), key data of that type, a comment of letters, digits and @._+:=,/-",
        )
    blob = base64.b64decode(value.split(" ")[1], validate=True)  # the pattern admits only valid base64
    n = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + n] != value.split(" ")[0].encode():  # pragma: no cover - the pattern guarantees it
        raise ValidationError(field, "SSH public key: the key data does not match its type")
    return value


def ssh_keys(value: object, field: str = "ssh_keys") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [line.strip() for line in value.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not isinstance(value, list):
        raise ValidationError(field, "expected a list of SSH public keys")
    if len(value) > MAX_SSH_KEYS:
        raise ValidationError(field, f"at most {MAX_SSH_KEYS} SSH keys")
    return [ssh_key(k, field) for k in value]


def new_token(nbytes: int = 24) -> str:
    """A fresh random token that matches TOKEN_PATTERN and never begins with '-'.

    A leading '-' would make the token read as an option when an operator pastes it into a command
    line (`labctl config set token ...`, curl, a shell script), so such draws are discarded.
    """
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value


def token(value: object, field: str = "token") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValidationError(field, "missing or malformed token")
    return value


def stage(value: object, field: str = "stage") -> str:
    if not isinstance(value, str) or not _STAGE.fullmatch(value):
        raise ValidationError(field, "a stage is 1-64 lowercase letters, digits, '_', '.' or '-'")
    return value


def interface_name(value: object, field: str = "interface") -> str:
    """A network interface name (eth0, enp3s0, br-lab, eth0.10): the one rule for every place that
    takes one (bastion settings, dnsmasq's configuration, labctl options)."""
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value):
        raise ValidationError(field, f"{value!r} is not an interface name: 1-15 letters, digits or _.@- "
                                     "(see `ip -br link`)")
    return value


def text(value: object, field: str, max_len: int = 1024, allow_newlines: bool = False) -> str:
    """Free text that is displayed but never templated: bounded, no control characters."""
    if not isinstance(value, str):
        raise ValidationError(field, "expected a string")
    if len(value) > max_len:
        raise ValidationError(field, f"longer than {max_len} characters")
    probe = value.replace("\n", "").replace("\t", " ") if allow_newlines else value
    if _CONTROL.search(probe):
        raise ValidationError(field, "control characters are not allowed")
    return value


# -- BMCs (bastion_app.power) ------------------------------------------------------------------------
BMC_DRIVERS = ("redfish", "ipmi")
# host[:port], for Redfish optionally behind http:// or https://; the host is an IPv4 address or an
# RFC 1123 host name, the port 1-65535. Nothing else (no path, no user@, no white space) gets through,
# and the published pattern is the whole rule (the API's schema and this module agree exactly).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_BMC_HOST = rf"(?:{_OCTET}(?:\.{_OCTET}){{3}}|(?:{_HN_LABEL}\.)*(?![0-9]+(?::|$)){_HN_LABEL})"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
IPMI_ADDRESS_PATTERN = rf"^{_BMC_HOST}(?::{_PORT})?$"
REDFISH_ADDRESS_PATTERN = rf"^(?:https?://)?{_BMC_HOST}(?::{_PORT})?$"
BMC_ADDRESS_MAX = 300
BMC_SYSTEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
BMC_USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
BMC_PASSWORD_PATTERN = r"^[\x20-\x7e]{1,128}$"
_BMC_ADDRESS = {"redfish": re.compile(REDFISH_ADDRESS_PATTERN), "ipmi": re.compile(IPMI_ADDRESS_PATTERN)}
_BMC_SYSTEM_ID = re.compile(BMC_SYSTEM_ID_PATTERN)
_BMC_USERNAME = re.compile(BMC_USERNAME_PATTERN)
_BMC_PASSWORD = re.compile(BMC_PASSWORD_PATTERN)


def bmc_address(value: object, driver: str = "redfish", field: str = "address") -> tuple[str | None, str, int | None]:
    """A BMC's address -> (scheme or None, host, port or None): [http(s)://]HOST[:PORT], the scheme
    for Redfish only, HOST an IPv4 address or a host name, PORT 1-65535."""
    pattern = _BMC_ADDRESS.get(driver)
    if pattern is None:
        raise ValidationError("driver", f"a BMC driver is one of {', '.join(BMC_DRIVERS)}")
    if not isinstance(value, str) or len(value) > BMC_ADDRESS_MAX or not pattern.fullmatch(value):
        form = "[https://|http://]HOST[:PORT]" if driver == "redfish" else "HOST[:PORT] (no scheme)"
        raise ValidationError(field, f"{str(value)[:80]!r} is not a {driver} BMC address: {form}, "
                                     "HOST an IPv4 address or a host name, PORT 1-65535")
    scheme, _, rest = value.rpartition("://")
    host, _, port = rest.partition(":")
    return scheme or None, host, int(port) if port else None


def _matching(pattern: re.Pattern, value: object, field: str, rule: str) -> str:
    """``value`` if it is a string that ``pattern`` matches whole; else the rule, never the value
    (a password must not come back in an error)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(field, rule)
    return value


def bmc_system_id(value: object, field: str = "system_id") -> str:
    return _matching(_BMC_SYSTEM_ID, value, field,
                     "a Redfish system id is 1-64 letters, digits or ._- (the last part of /redfish/v1/Systems/<id>)")


def bmc_username(value: object, field: str = "username") -> str:
    return _matching(_BMC_USERNAME, value, field, "a BMC user name is 1-64 letters, digits or ._@-")


def bmc_password(value: object, field: str = "password") -> str:
    return _matching(_BMC_PASSWORD, value, field, "a BMC password is 1-128 printable ASCII characters")
