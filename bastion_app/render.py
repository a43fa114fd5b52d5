"""One Jinja environment for everything the bastion serves to machines (iPXE scripts, kickstarts,
autoinstall, dnsmasq configs). Templates live under bastion_app/templates/<kind>/; the environment
and its filters (``ipxe``, ``shquote``, ``json``, ``yaml_str``) are labcore.templating's.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from labcore.templating import UnsafeValue, environment

__all__ = ["TEMPLATES", "UnsafeValue", "env", "render"]

TEMPLATES = Path(__file__).parent / "templates"

_env: jinja2.Environment | None = None


def env() -> jinja2.Environment:
    global _env
    if _env is None:
        _env = environment(TEMPLATES)
    return _env


def render(name: str, **ctx) -> str:
    return env().get_template(name).render(**ctx)
