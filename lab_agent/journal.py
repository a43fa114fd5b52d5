"""The journal relay: `journalctl -o json` read line by line, each entry cut down to what an
operator reads (time, unit, priority, message) plus its cursor, so that a follow interrupted by a
reconnect resumes where it stopped (no entry lost, none sent twice).

Resuming uses `--cursor C` (the entry C itself first) and drops that first entry, rather than
`--after-cursor C`: with a filter such as `-u UNIT`, `--after-cursor` skipped the first matching
entry after the cursor's position even when it was not the cursor's entry, so one entry was lost
(systemd/systemd#30288, fixed in systemd 255; Debian 12 ships 252)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

UNIT = re.compile(r"^[A-Za-z0-9@._:\\-]{1,256}$")
SINCE = re.compile(r"^[A-Za-z0-9 :.+-]{1,64}$")  # journalctl's time specifications: dates, 'today', '-1h', ...
CURSOR = re.compile(r"^[A-Za-z0-9=;_-]{1,512}$")
DEFAULT_LINES = 200


def argv(*, unit: str | None = None, since: str | None = None, after_cursor: str | None = None, follow: bool = False,
         lines: int | None = None, journalctl: str = "journalctl") -> list[str]:
    """journalctl's argv; every value checked (each is one argv item, never a shell word; the
    patterns keep option-like values out)."""
    out = [journalctl, "-o", "json", "--no-pager", "--quiet"]
    if unit is not None:
        if not UNIT.match(unit) or unit.startswith("-"):
            raise ValueError(f"not a unit name: {unit!r}")
        out += ["-u", unit]
    if after_cursor is not None:
        if not CURSOR.match(after_cursor):
            raise ValueError("not a journal cursor")
        out += ["--cursor", after_cursor]  # relay() drops the cursor's own entry
    elif since is not None:
        if not SINCE.match(since):
            raise ValueError(f"not a time: {since!r}")
        out += ["--since", since]
    else:
        out += ["-n", str(lines or DEFAULT_LINES)]
    if follow:
        out.append("-f")
    return out


def _text(value) -> str:
    if isinstance(value, list):  # journald's JSON for a non-UTF-8 field: a list of byte values
        return bytes(v & 0xFF for v in value if isinstance(v, int)).decode("utf-8", "replace")
    return "" if value is None else str(value)


def entry(line: str) -> dict | None:
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "__CURSOR" not in raw:
        return None
    return {"cursor": raw["__CURSOR"], "time_us": int(raw.get("__REALTIME_TIMESTAMP") or 0),
            "unit": _text(raw.get("_SYSTEMD_UNIT") or raw.get("SYSLOG_IDENTIFIER")), "priority": int(raw.get("PRIORITY") or 6),
            "message": _text(raw.get("MESSAGE"))}


async def relay(args: list[str], emit: Callable[[dict], Awaitable[None]]) -> int:
    """Run journalctl and ``emit`` each entry (not the entry of ``--cursor``, already sent before);
    returns journalctl's exit code. Cancelling kills it."""
    skip = args[args.index("--cursor") + 1] if "--cursor" in args else None
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, limit=1 << 20)
    try:
        while line := await proc.stdout.readline():
            e = entry(line.decode("utf-8", "replace"))
            if e is not None and skip is not None and e["cursor"] == skip:
                skip = None
                continue
            skip = None
            if e is not None:
                await emit(e)
        return await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
