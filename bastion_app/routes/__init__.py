"""HTTP routes, one blueprint per area: boot (machine-facing scripts), api (JSON), ops."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import current_app, request

from bastion_app import binding
from bastion_app.errors import ApiError
from labcore import schemas, validate

_HOST = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}(?::\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::\d{1,5})?")


def cfg():
    return current_app.config["LAB"]


def json_body(model):
    """Parse the request body as JSON into a pydantic model (400 for bad JSON, 422 for bad fields)."""
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "empty body", "send a JSON object")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body is not valid JSON", str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise ApiError(400, "body must be a JSON object")
    return model.model_validate(doc)


def mac_arg(value: str | None, field: str = "mac") -> str:
    if value is None or value == "":
        raise ApiError(400, f"missing {field}", f"pass ?{field}=aa:bb:cc:dd:ee:ff")
    try:
        return validate.mac(value, field)
    except validate.ValidationError as exc:
        raise ApiError(400, exc.message, {"field": field}) from None


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(400, f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def caller_claim(mac: str) -> binding.Claim:
    """What the lease file and the neighbour table say about this request speaking for ``mac``."""
    return binding.claim(binding.leases_path(cfg()), mac, request.remote_addr)[0]


def install_machine(mac: str, token: str) -> dict[str, Any]:
    """The machine whose install this request belongs to: its token, from its address. Anything
    else is one uniform 403 (store.NOT_ACCEPTED), whether the MAC exists or not."""
    from bastion_app import get_store

    store = get_store()
    m = store.get(mac)
    store.check_install_token(m, token, ip=request.remote_addr, verdict=caller_claim(mac))
    return m  # type: ignore[return-value]


def base_url() -> str:
    """The URL a machine uses to reach us: the configured public_url, else the (strictly
    validated) Host the machine asked for, else the detected address."""
    c = cfg()
    if c.public_url:
        return c.public_url.rstrip("/")
    host = request.host
    if host and _HOST.fullmatch(host):
        return f"{request.scheme}://{host}"
    return c.base_url()


#: the fields of schemas.MachineView that are not the store's column of the same name
_DERIVED = {"stalled": lambda m: m["failure"] == "stalled", "debug": lambda m: m["debug_mode"]}


def machine_view(m: dict[str, Any]) -> dict[str, Any]:
    """A machine as the API shows it: the fields of :class:`schemas.MachineView`, in its order, from
    the store's record (so never its install token); times (``*_at``) as ISO 8601."""
    view = {}
    for name in schemas.MachineView.model_fields:
        if name in _DERIVED:
            view[name] = _DERIVED[name](m)
        elif name.endswith("_at"):
            view[name] = schemas.api_time(m[name]) if m[name] else None
        else:
            view[name] = m[name]
    return view


def event_view(e: dict[str, Any]) -> dict[str, Any]:
    return {**e, "ts": schemas.api_time(e["ts"])}
