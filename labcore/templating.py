"""The Jinja environment for text that reaches a machine: iPXE scripts, kickstarts, autoinstall,
dnsmasq configurations (the bastion, bastion_app.render) and boot media (labctl provision makeiso).
Templates are Jinja files under each package's ``templates/``.

Values are validated before they get here (labcore.validate); the filters are a second line:
``ipxe`` refuses any value that could end an iPXE token or line, ``shquote`` makes a value one
single-quoted shell word, ``yaml_str`` / ``json`` emit properly escaped scalars.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jinja2

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


def environment(templates: Path) -> jinja2.Environment:
    """A Jinja environment for the templates under ``templates``: undefined names are errors, no
    HTML escaping (nothing here is HTML), block tags leave no blank lines, and the filters above."""
    e = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
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
    return e
