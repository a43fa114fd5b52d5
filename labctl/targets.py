"""Target resolution: a hostname, a MAC or an IP -> one machine.

A MAC matches exactly (any common spelling); an IP matches the machine's last known address; a
name matches a full host name or, if unique, its first label (``node1`` for ``node1.lab``). An
unknown or ambiguous target is an error that lists the candidates.
"""

from __future__ import annotations

import difflib
import ipaddress
from typing import Any

from labcore import validate
from labctl.errors import NotFound, UsageError


def _label(m: dict[str, Any]) -> str:
    return f"{m.get('hostname') or '-'} ({m['mac']}, {m.get('ip') or 'no IP'}, {m['state']})"


def match(machines: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Every machine the target could mean (exact matches win over short-name matches)."""
    target = target.strip()
    if not target:
        return []
    try:
        mac = validate.mac(target)
    except validate.ValidationError:
        mac = None
    if mac:
        return [m for m in machines if m["mac"] == mac]
    try:
        ip = str(ipaddress.ip_address(target))
    except ValueError:
        ip = None
    if ip:
        return [m for m in machines if m.get("ip") == ip]
    name = target.lower().rstrip(".")
    if not name:
        return []
    exact = [m for m in machines if (m.get("hostname") or "") == name]
    if exact:
        return exact
    return [m for m in machines if (m.get("hostname") or "").split(".")[0] == name]


def resolve(machines: list[dict[str, Any]], target: str) -> dict[str, Any]:
    found = match(machines, target)
    if len(found) == 1:
        return found[0]
    if found:
        raise UsageError(
            f"target {target!r} is ambiguous: it matches {len(found)} machines: " + "; ".join(_label(m) for m in found),
            "name one of them by MAC address")
    names = [n for m in machines for n in (m.get("hostname"), m["mac"], m.get("ip")) if n]
    close = difflib.get_close_matches(target.lower(), names, n=5, cutoff=0.5)
    if close:
        hint = "did you mean: " + ", ".join(close)
    elif machines:
        hint = "known machines: " + "; ".join(_label(m) for m in machines[:10]) + (f" (and {len(machines) - 10} more: labctl get machines)" if len(machines) > 10 else "")
    else:
        hint = "the bastion knows no machines yet (PXE-boot one to discover it)"
    raise NotFound(f"no machine matches {target!r} (by host name, MAC or IP)", hint)


def resolve_target(client, target: str) -> dict[str, Any]:
    """Resolve against the bastion's current machine list."""
    return resolve(client.machines(), target)
