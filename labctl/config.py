"""labctl's configuration: ~/.labctl/config.yaml, then LABCTL_* environment variables, then flags.

The file holds the operator token, so it is written with mode 0600. ``LABCTL_CONFIG`` names another
file (tests use a temporary one); ``LABCTL_HOME`` moves the whole ~/.labctl directory (runs too).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from labcore.yamlfile import YamlFileError, read_mapping
from labctl.errors import UsageError

OUTPUTS = ("table", "wide", "json", "yaml")
DEFAULTS = {"bastionUrl": "http://127.0.0.1:8080", "labdUrl": "", "token": "", "output": "table"}
ENV = {"bastionUrl": "LABCTL_BASTION_URL", "labdUrl": "LABCTL_LABD_URL", "token": "LABCTL_TOKEN", "output": "LABCTL_OUTPUT"}
KEYS = tuple(DEFAULTS)
_URL = re.compile(r"^https?://[A-Za-z0-9.\[\]:_-]+(/[A-Za-z0-9._~/-]*)?$")


def home() -> Path:
    """The labctl directory: $LABCTL_HOME, else ~/.labctl."""
    return Path(os.environ.get("LABCTL_HOME") or Path.home() / ".labctl")


def path() -> Path:
    return Path(os.environ.get("LABCTL_CONFIG") or home() / "config.yaml")


def check_value(key: str, value: str) -> str:
    """Validate one setting; returns the normalised value."""
    if key not in KEYS:
        raise UsageError(f"unknown setting {key!r}", f"known settings: {', '.join(KEYS)}")
    value = value.strip()
    if key in ("bastionUrl", "labdUrl") and value and not _URL.fullmatch(value):
        raise UsageError(f"{key}: {value!r} is not an http(s) URL", "e.g. http://10.0.0.1:8080")
    if key == "output" and value not in OUTPUTS:
        raise UsageError(f"output: {value!r} is not one of {', '.join(OUTPUTS)}")
    if key == "token" and value and (any(c.isspace() for c in value) or not 16 <= len(value) <= 512):
        raise UsageError("token: must be one word of 16-512 characters (the output of `lab-bastion token`)")
    return value.rstrip("/") if key.endswith("Url") else value


def read_file(p: Path | None = None) -> dict[str, str]:
    p = p or path()
    try:
        doc = read_mapping(p)
    except YamlFileError as exc:
        raise UsageError(str(exc), f"fix or delete the file (known settings: {', '.join(KEYS)})") from None
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise UsageError(f"{p}: unknown setting(s) {', '.join(unknown)}", f"known settings: {', '.join(KEYS)}")
    return {k: check_value(k, str(v)) for k, v in doc.items() if v is not None}


def write_file(values: dict[str, str], p: Path | None = None) -> Path:
    """Write the settings atomically with mode 0600 (the file holds a token)."""
    p = p or path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({k: values[k] for k in KEYS if k in values}, f, sort_keys=False)
    os.chmod(tmp, 0o600)
    tmp.replace(p)
    return p


@dataclass
class Settings:
    """The effective settings and where each came from (flag, env, file or default)."""

    values: dict[str, str]
    sources: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values[key]


def load(flags: dict[str, str | None] | None = None, env=None) -> Settings:
    env = os.environ if env is None else env
    file_values = read_file()
    values, sources = {}, {}
    for key in KEYS:
        flag = (flags or {}).get(key)
        if flag is not None:
            values[key], sources[key] = check_value(key, flag), "flag"
        elif env.get(ENV[key]):
            values[key], sources[key] = check_value(key, env[ENV[key]]), f"env {ENV[key]}"
        elif key in file_values:
            values[key], sources[key] = file_values[key], f"file {path()}"
        else:
            values[key], sources[key] = DEFAULTS[key], "default"
    return Settings(values, sources)
