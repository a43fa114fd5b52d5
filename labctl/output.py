"""Printers: commands gather data, these render it as a table (rich), JSON or YAML.

``-o table`` and ``-o wide`` are for people; ``-o json`` and ``-o yaml`` print the API's own
objects unchanged, for scripts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False,
                   width=None if (sys.stderr if stderr else sys.stdout).isatty() else 4000)


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def emit(data: Any, fmt: str, table: Callable[[], None]) -> None:
    """Print ``data`` as JSON/YAML, or call ``table`` to print it for people."""
    if fmt in ("json", "yaml"):
        sys.stdout.write(dump(data, fmt))
    else:
        table()


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], header: bool = True) -> None:
    t = Table(box=None, show_header=header, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for name, _ in columns:
        t.add_column(name, no_wrap=True, overflow="fold")
    for row in rows:
        t.add_row(*(_cell(fn(row)) for _, fn in columns))
    con = console()
    with con.capture() as cap:
        con.print(t)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("[", "\\[")


# -- machines ----------------------------------------------------------------------------------
def age(iso: str | None, now: datetime | None = None) -> str:
    """kubectl-style age: 45s, 12m, 3h, 5d."""
    if not iso:
        return "-"
    then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    secs = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{secs // n}{unit}"
    return f"{secs}s"


def progress_text(m: dict[str, Any]) -> str:
    if m.get("state") == "failed":
        return f"failed: {m.get('failure') or m.get('stage') or 'unknown'}"
    if m.get("state") in ("install_queued", "installing"):
        pct = f" {m['percent']}%" if m.get("percent") is not None else ""
        return f"{m.get('stage') or ''}{pct}".strip()
    return ""


def hw_summary(m: dict[str, Any]) -> str:
    hw = m.get("hardware") or {}
    cpu = (hw.get("cpu") or {}).get("cores") or 0
    mem = hw.get("memory_mb") or 0
    disks = len(hw.get("disks") or [])
    if not (cpu or mem or disks):
        return ""
    return f"{cpu}c/{round(mem / 1024)}G/{disks}d"


MACHINE_COLUMNS: list[Column] = [
    ("NAME", lambda m: m.get("hostname")),
    ("MAC", lambda m: m["mac"]),
    ("STATE", lambda m: m["state"] + (" (debug)" if m.get("debug") else "")),
    ("ROLE", lambda m: m.get("role")),
    ("OS", lambda m: m.get("os")),
    ("IP", lambda m: m.get("ip")),
    ("PROGRESS", progress_text),
    ("AGE", lambda m: age(m.get("created_at"))),
]
MACHINE_WIDE: list[Column] = MACHINE_COLUMNS + [
    ("DISK", lambda m: m.get("disk") or ("auto" if m.get("hostname") else "")),
    ("HARDWARE", hw_summary),
    ("FIRMWARE", lambda m: (m.get("hardware") or {}).get("firmware")),
    ("LAST SEEN", lambda m: age(m.get("last_seen_at"))),
]


def machines(rows: list[dict[str, Any]], fmt: str, header: bool = True) -> None:
    emit({"machines": rows} if fmt in ("json", "yaml") else rows, fmt,
         lambda: print_table(rows, MACHINE_WIDE if fmt == "wide" else MACHINE_COLUMNS, header))


def machine(m: dict[str, Any], fmt: str) -> None:
    """One machine: JSON/YAML as the API gives it; table = the one-row listing."""
    emit(m, fmt, lambda: print_table([m], MACHINE_WIDE if fmt == "wide" else MACHINE_COLUMNS))


def describe(m: dict[str, Any], fmt: str) -> None:
    emit(m, fmt, lambda: _describe(m))


def _describe(m: dict[str, Any]) -> None:
    c = console()
    hw = m.get("hardware") or {}
    cpu, dmi = hw.get("cpu") or {}, hw.get("dmi") or {}

    def field(name: str, value: Any) -> None:
        c.print(f"{name + ':':<18}{_cell(value)}")

    field("Name", m.get("hostname"))
    field("MAC", m["mac"])
    field("State", m["state"])
    field("IP", m.get("ip"))
    if m.get("debug"):
        field("Pending debug", m["debug"])
    if m.get("failure"):
        field("Failure", m["failure"])
    field("Created", m.get("created_at"))
    field("Last seen", m.get("last_seen_at"))
    c.print("Install:")
    for k in ("role", "os"):
        field(f"  {k.capitalize()}", m.get(k))
    field("  Disk", m.get("disk") or ("auto-detect" if m.get("hostname") else ""))
    field("  SSH keys", len(m.get("ssh_keys") or []))
    field("  Stage", progress_text(m) or m.get("stage"))
    field("  Started", m.get("install_started_at"))
    field("  Installed", m.get("installed_at"))
    c.print("Hardware:")
    field("  Vendor", " ".join(x for x in (dmi.get("vendor"), dmi.get("product")) if x))
    field("  Serial", dmi.get("serial"))
    field("  Firmware", hw.get("firmware"))
    field("  CPU", f"{cpu.get('model', '')} ({cpu.get('cores', 0)} cores, {cpu.get('threads', 0)} threads)" if cpu else "")
    field("  Memory", f"{hw.get('memory_mb')} MiB" if hw.get("memory_mb") else "")
    for d in hw.get("disks") or []:
        size = f"{d.get('size_bytes', 0) / 1e9:.0f} GB"
        field(f"  Disk {d.get('name')}", f"{size} {d.get('transport', '')} {d.get('model', '')}".strip())
    for n in hw.get("nics") or []:
        field(f"  NIC {n.get('name')}", f"{n.get('mac')} {n.get('driver', '')} link={'up' if n.get('link') else 'down'}")
    c.print("Events:")
    print_table(m.get("events") or [], EVENT_COLUMNS)


EVENT_COLUMNS: list[Column] = [
    ("ID", lambda e: e["id"]),
    ("TIME", lambda e: e["ts"]),
    ("ACTOR", lambda e: e["actor"]),
    ("KIND", lambda e: e["kind"]),
    ("FROM", lambda e: e.get("from_state")),
    ("TO", lambda e: e.get("to_state")),
    ("REASON", lambda e: e.get("reason")),
]


def error(message: str, hint: str | None = None) -> None:
    err = console(stderr=True)
    err.print(f"labctl: error: {message}", markup=False, highlight=False)
    if hint:
        err.print(f"  hint: {hint}", markup=False, highlight=False)
