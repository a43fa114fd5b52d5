"""Validation of every value that can reach a template, a shell line or a YAML document.

Each validator returns the normalised value or raises :class:`ValidationError`. They are strict on
purpose: nothing they accept can add a line to a kickstart, an iPXE script or a shell command.
"""

from __future__ import annotations

import base64
import binascii
import re

import netaddr

ROLES = ("vanilla", "worker", "infra", "labcontroller")
OSES = ("fedora-43", "ubuntu-26.04")
DEBUG_MODES = ("rescue", "pxe")

MAX_SSH_KEYS = 16
MAX_SSH_KEY_LEN = 16384

_MAC_CHARS = re.compile(r"^[0-9A-Fa-f:.\-]{12,17}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DISK = re.compile(r"^/dev/[A-Za-z0-9_][A-Za-z0-9_.:+@/-]{0,120}$")
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_SSH_KEY = re.compile(r"^(?P<type>[a-z0-9@.-]+) (?P<blob>[A-Za-z0-9+/]+={0,3})(?: (?P<comment>[A-Za-z0-9@._+:=,/-]{1,200}))?$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_STAGE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ValidationError(ValueError):
    """A value was rejected; ``field`` names it for the API's error detail."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def mac(value: object, field: str = "mac") -> str:
    """Normalise a MAC address to lowercase colon form (aa:bb:cc:dd:ee:ff)."""
    if not isinstance(value, str) or not _MAC_CHARS.fullmatch(value):
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
    if len(value) > 253:
        raise ValidationError(field, "longer than 253 characters")
    name = value.lower()
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValidationError(
                field,
                f"{value!r} is not an RFC 1123 host name: labels of 1-63 letters, digits or hyphens, "
                "not starting or ending with a hyphen",
            )
    if labels[-1].isdigit():
        raise ValidationError(field, f"{value!r}: the last label must not be all digits")
    return name


def role(value: object, field: str = "role") -> str:
    if value not in ROLES:
        raise ValidationError(field, f"unknown role {value!r} (one of: {', '.join(ROLES)})")
    return value  # type: ignore[return-value]


def os_name(value: object, field: str = "os") -> str:
    if value not in OSES:
        raise ValidationError(field, f"unknown os {value!r} (one of: {', '.join(OSES)})")
    return value  # type: ignore[return-value]


def disk(value: object, field: str = "disk") -> str:
    """'' means auto-detect; otherwise a /dev/... path of safe characters."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _DISK.fullmatch(value) or "/../" in value or value.endswith("/.."):
        raise ValidationError(
            field, f"{value!r} is not a disk device: use '' (auto-detect) or a path like /dev/nvme0n1"
        )
    return value


def ssh_key(value: object, field: str = "ssh_keys") -> str:
    """One OpenSSH public key line: type, base64 blob whose embedded type matches, optional comment."""
    if not isinstance(value, str):
        raise ValidationError(field, "an SSH public key must be a string")
    key = value.strip()
    if len(key) > MAX_SSH_KEY_LEN:
        raise ValidationError(field, "SSH public key too long")
    m = _SSH_KEY.fullmatch(key)
    if not m or m.group("type") not in _SSH_KEY_TYPES:
        raise ValidationError(
            field,
            "not an OpenSSH public key line ('TYPE BASE64 [comment]', comment of letters, digits and @._+:=,/-)",
        )
    try:
        blob = base64.b64decode(m.group("blob"), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(field, "SSH public key: the key data is not valid base64") from None
    if len(blob) < 4:
        raise ValidationError(field, "SSH public key: key data too short")
    n = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + n] != m.group("type").encode():
        raise ValidationError(field, "SSH public key: the key data does not match its type")
    return key


def ssh_keys(value: object, field: str = "ssh_keys") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not isinstance(value, list):
        raise ValidationError(field, "expected a list of SSH public keys")
    if len(value) > MAX_SSH_KEYS:
        raise ValidationError(field, f"at most {MAX_SSH_KEYS} SSH keys")
    return [ssh_key(k, field) for k in value]


def token(value: object, field: str = "token") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValidationError(field, "missing or malformed token")
    return value


def stage(value: object, field: str = "stage") -> str:
    if not isinstance(value, str) or not _STAGE.fullmatch(value):
        raise ValidationError(field, "a stage is 1-64 lowercase letters, digits, '_', '.' or '-'")
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
