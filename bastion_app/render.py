"""One Jinja environment for everything the bastion serves to machines (iPXE scripts, kickstarts,
autoinstall, dnsmasq configs). Templates live under bastion_app/templates/<kind>/.

Values are validated before they get here (labcore.validate); the filters below are a second
line: `ipxe` refuses any value that could end an iPXE token or line, `shquote` makes a value one
single-quoted shell word, `yaml_str` / `json` emit properly escaped scalars.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"
_IPXE_SAFE = re.compile(r"[A-Za-z0-9._:/?=&%@+,~\[\]-]*")


class UnsafeValue(ValueError):
    pass


def ipxe_value(value) -> str:
    s = str(value)
    if not _IPXE_SAFE.fullmatch(s):
        raise UnsafeValue(f"refusing to put {s!r} into an iPXE script")
    return s


def shquote(value) -> str:
    return shlex.quote(str(value))


def to_json(value) -> str:
    # ensure_ascii keeps U+2028 and friends out; the result is also a valid YAML flow scalar
    return json.dumps(value, ensure_ascii=True)


_env: jinja2.Environment | None = None


def env() -> jinja2.Environment:
    global _env
    if _env is None:
        e = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        e.filters["ipxe"] = ipxe_value
        e.filters["shquote"] = shquote
        e.filters["json"] = to_json
        e.filters["yaml_str"] = to_json
        _env = e
    return _env


def render(name: str, **ctx) -> str:
    return env().get_template(name).render(**ctx)
