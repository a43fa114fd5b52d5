"""labctl's configuration: ~/.labctl/config.yaml, then LABCTL_* environment variables, then flags.

The file holds the operator token, so it is written with mode 0600. ``LABCTL_CONFIG`` names another
file (tests use a temporary one); ``LABCTL_HOME`` moves the whole ~/.labctl directory (runs too).

Like kubectl's kubeconfig, the file may name several bastions (and labd instances) as contexts::

    current-context: lab1          # `labctl config use-context lab1`
    contexts:
      lab1: {bastionUrl: http://10.0.0.2:8080, token: ...}
      lab2: {bastionUrl: http://10.1.0.2:8080, token: ...}
    output: table                  # top-level settings apply under every context

The selected context (``--context NAME``, else $LABCTL_CONTEXT, else current-context) overrides the
top-level settings; environment variables and flags override both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labcore import private
from labcore.yamlfile import YamlFileError, read_mapping
from labctl.errors import UsageError

OUTPUTS = ("table", "wide", "json", "yaml")
DEFAULTS = {"bastionUrl": "http://127.0.0.1:8080", "labdUrl": "", "token": "", "output": "table"}
ENV = {"bastionUrl": "LABCTL_BASTION_URL", "labdUrl": "LABCTL_LABD_URL", "token": "LABCTL_TOKEN", "output": "LABCTL_OUTPUT"}
KEYS = tuple(DEFAULTS)
CONTEXTS, CURRENT = "contexts", "current-context"
CONTEXT_ENV = "LABCTL_CONTEXT"
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
_URL = re.compile(r"^https?://[A-Za-z0-9.\[\]:_-]+(/[A-Za-z0-9._~/-]*)?$")


def home() -> Path:
    """The labctl directory: $LABCTL_HOME, else ~/.labctl."""
    return Path(os.environ.get("LABCTL_HOME") or Path.home() / ".labctl")


def path() -> Path:
    return Path(os.environ.get("LABCTL_CONFIG") or home() / "config.yaml")


def ca_path(context: str) -> Path:
    """The CA certificate of the labd named by ``context``, pinned at `labctl login` (beside the
    settings file)."""
    return path().parent / "ca" / f"{check_context_name(context)}.pem"


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


def check_context_name(name: str) -> str:
    if not _CONTEXT_NAME.fullmatch(name or ""):
        raise UsageError(f"invalid context name {name!r}",
                         "1-63 letters, digits and ._@- (beginning with a letter or digit)")
    return name


@dataclass
class Doc:
    """The settings file: top-level settings, the named contexts and the current one."""

    values: dict[str, str] = field(default_factory=dict)
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    current: str = ""

    def context(self, name: str) -> dict[str, str]:
        """The settings of context ``name`` (UsageError naming the known ones if there is none)."""
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none yet"
            raise UsageError(f"no context named {name!r} in {path()} (known: {known})",
                             f"create it: labctl config set-context {name} --bastion URL --token TOKEN")
        return self.contexts[name]


def _settings(mapping: Any, where: str) -> dict[str, str]:
    if not isinstance(mapping, dict):
        raise UsageError(f"{where}: expected a mapping of settings", f"known settings: {', '.join(KEYS)}")
    unknown = sorted(str(k) for k in set(mapping) - set(KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown setting(s) {', '.join(unknown)}", f"known settings: {', '.join(KEYS)}")
    return {k: check_value(k, str(v)) for k, v in mapping.items() if v is not None}


def read_doc(p: Path | None = None) -> Doc:
    p = p or path()
    try:
        raw = read_mapping(p)
    except YamlFileError as exc:
        raise UsageError(str(exc), f"fix or delete the file (known settings: {', '.join(KEYS)})") from None
    contexts = raw.pop(CONTEXTS, None) or {}
    current = str(raw.pop(CURRENT, None) or "")
    if not isinstance(contexts, dict):
        raise UsageError(f"{p}: contexts must be a mapping of NAME: {{settings}}")
    doc = Doc(_settings(raw, str(p)),
              {check_context_name(str(n)): _settings(c or {}, f"{p}: context {n}") for n, c in contexts.items()},
              check_context_name(current) if current else "")
    return doc


def write_doc(doc: Doc, p: Path | None = None) -> Path:
    """Write the settings atomically with mode 0600 (the file holds tokens)."""
    p = p or path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out: dict[str, Any] = {}
    if doc.current:
        out[CURRENT] = doc.current
    out.update({k: doc.values[k] for k in KEYS if doc.values.get(k)})
    if doc.contexts:
        out[CONTEXTS] = {n: {k: c[k] for k in KEYS if c.get(k)} for n, c in sorted(doc.contexts.items())}
    private.write(p, yaml.safe_dump(out, sort_keys=False))
    return p


@dataclass
class Settings:
    """The effective settings, where each came from (flag, env, context, file or default) and the
    selected context ('' for none)."""

    values: dict[str, str]
    sources: dict[str, str]
    context: str = ""

    def __getitem__(self, key: str) -> str:
        return self.values[key]


def selected_context(doc: Doc, flag: str | None, env) -> tuple[str, str]:
    """(name, where it was chosen): --context, $LABCTL_CONTEXT or current-context; ('', '') if none."""
    if flag:
        return check_context_name(flag), "--context"
    if env.get(CONTEXT_ENV):
        return check_context_name(env[CONTEXT_ENV]), f"env {CONTEXT_ENV}"
    return doc.current, "current-context"


def load(flags: dict[str, str | None] | None = None, env=None) -> Settings:
    env = os.environ if env is None else env
    flags = flags or {}
    doc = read_doc()
    name, _ = selected_context(doc, flags.get("context"), env)
    ctx_values = doc.context(name) if name else {}
    values, sources = {}, {}
    for key in KEYS:
        flag = flags.get(key)
        if flag is not None:
            values[key], sources[key] = check_value(key, flag), "flag"
        elif env.get(ENV[key]):
            values[key], sources[key] = check_value(key, env[ENV[key]]), f"env {ENV[key]}"
        elif key in ctx_values:
            values[key], sources[key] = ctx_values[key], f"context {name} ({path()})"
        elif key in doc.values:
            values[key], sources[key] = doc.values[key], f"file {path()}"
        else:
            values[key], sources[key] = DEFAULTS[key], "default"
    return Settings(values, sources, name)
