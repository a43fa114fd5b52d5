"""Per-machine install logs: a separate SQLite file ``<data>/logs.db`` in WAL mode.

Shared by every gunicorn worker (``POST /api/log``, the installer webhook, the readers) and the
syslog listener (batched inserts). It is its own file so that a flood of log lines never holds the
state database's write lock that dispatch and progress need. Each machine keeps at most
``max_lines`` lines (older ones are trimmed in steps of a tenth, so the bound is approximate by
that much); the newest N of a machine are one index range scan away.

Lines from senders the bastion cannot attribute to a machine are kept under ``unattributed``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bastion_app.db import Database, StorageUnavailable
from labcore import progress as timeline

UNATTRIBUTED = "unattributed"
#: Longest text kept for one line (characters); longer lines are cut and marked.
MAX_TEXT = 8192
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS lines (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        mac TEXT NOT NULL,
        ts REAL NOT NULL,
        source TEXT NOT NULL,
        severity TEXT NOT NULL,
        app TEXT NOT NULL DEFAULT '',
        host TEXT NOT NULL DEFAULT '',
        ip TEXT,
        text TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS lines_mac ON lines(mac, id)",
]

#: (mac, ts, source, severity, app, host, ip, text)
Row = tuple[str, float, str, str, str, str, "str | None", str]


_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Control characters (terminal escapes among them) shown as \\xNN, so a log line can never
    drive the operator's terminal; tabs and newlines stay."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f" [... {len(text) - limit} more characters cut]"


class LogStore(Database):
    def __init__(self, path: str | Path, *, max_lines: int = 20000, busy_timeout_s: float = 30.0):
        # Logs are not state: NORMAL keeps every committed line across a crash of the process
        # (WAL) and only risks the last moments on power loss, without an fsync per batch.
        super().__init__(path, synchronous="NORMAL", busy_timeout_s=busy_timeout_s)
        self.max_lines = max(10, int(max_lines))
        self._since_trim: dict[str, int] = {}
        self._trim_lock = threading.Lock()
        try:
            with self.tx() as c:
                for stmt in _SCHEMA:
                    c.execute(stmt)
        except StorageUnavailable:
            if not self.path.exists():
                raise  # a read-only data directory can still be read, if there is something to read
        self.creating = False
        self.close()  # no connection crosses a fork (gunicorn preloads the app, then forks)

    @classmethod
    def from_config(cls, cfg) -> LogStore:
        """The bastion's log store: ``<data>/logs.db``, ``log_lines`` lines kept per machine."""
        return cls(cfg.data_path / "logs.db", max_lines=cfg.log_lines)

    # -- writes ------------------------------------------------------------------------------
    def append(self, rows: Iterable[Row]) -> int:
        """Store a batch of lines (texts already cleaned and clipped: :func:`clean`, :func:`clip`)
        in one transaction; trims machines that outgrew their bound. Returns the number stored."""
        rows = list(rows)
        if not rows:
            return 0
        counts: dict[str, int] = {}
        for r in rows:
            counts[r[0]] = counts.get(r[0], 0) + 1
        step = max(1, self.max_lines // 10)
        with self.tx() as c:
            c.executemany("INSERT INTO lines(mac, ts, source, severity, app, host, ip, text) VALUES (?,?,?,?,?,?,?,?)", rows)
            with self._trim_lock:
                due = []
                for mac, n in counts.items():
                    self._since_trim[mac] = self._since_trim.get(mac, 0) + n
                    if self._since_trim[mac] >= step:
                        self._since_trim[mac] = 0
                        due.append(mac)
            for mac in due:
                self._trim(c, mac)
        return len(rows)

    def _trim(self, c: sqlite3.Connection, mac: str) -> None:
        row = c.execute("SELECT id FROM lines WHERE mac=? ORDER BY id DESC LIMIT 1 OFFSET ?", (mac, self.max_lines)).fetchone()
        if row is not None:
            c.execute("DELETE FROM lines WHERE mac=? AND id<=?", (mac, row[0]))

    def trim_all(self) -> None:
        with self.tx() as c:
            for (mac,) in c.execute("SELECT DISTINCT mac FROM lines").fetchall():
                self._trim(c, mac)

    # -- reads -------------------------------------------------------------------------------
    def lines(self, mac: str, *, since: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Lines of one machine with id > since, oldest first."""
        rows = self.conn().execute(
            "SELECT * FROM lines WHERE mac=? AND id>? ORDER BY id LIMIT ?", (mac, since, limit)
        ).fetchall()
        return [dict(r) for r in rows]

    def tail(self, mac: str, n: int) -> list[dict[str, Any]]:
        """The newest n lines of one machine, oldest first."""
        rows = self.conn().execute("SELECT * FROM lines WHERE mac=? ORDER BY id DESC LIMIT ?", (mac, n)).fetchall()
        return [dict(r) for r in reversed(rows)]

    def last_id(self, mac: str | None = None) -> int:
        if mac is None:
            row = self.conn().execute("SELECT max(id) FROM lines").fetchone()
        else:
            row = self.conn().execute("SELECT max(id) FROM lines WHERE mac=?", (mac,)).fetchone()
        return row[0] or 0

    def count(self, mac: str | None = None) -> int:
        if mac is None:
            return self.conn().execute("SELECT count(*) FROM lines").fetchone()[0]
        return self.conn().execute("SELECT count(*) FROM lines WHERE mac=?", (mac,)).fetchone()[0]

    def has(self, mac: str) -> bool:
        return self.conn().execute("SELECT 1 FROM lines WHERE mac=? LIMIT 1", (mac,)).fetchone() is not None

    def changed_macs(self, since: int) -> tuple[int, set[str]]:
        """(newest id, machines with lines newer than since): what the follow watcher polls."""
        c = self.conn()
        top = c.execute("SELECT max(id) FROM lines").fetchone()[0] or 0
        if top <= since:
            return top, set()
        return top, {r[0] for r in c.execute("SELECT DISTINCT mac FROM lines WHERE id>? AND id<=?", (since, top))}

    def last_ts(self, mac: str) -> float | None:
        row = self.conn().execute("SELECT ts FROM lines WHERE mac=? ORDER BY id DESC LIMIT 1", (mac,)).fetchone()
        return row[0] if row else None


def keepalive_interval(stall_timeout: float) -> float:
    """How often log lines from an installing machine count as a sign of life (a progress step):
    a third of the stall timeout, between 1 s and 60 s."""
    return max(1.0, min(60.0, stall_timeout / 3))


def advance(store, mac: str, step: timeline.Progress | None, *, machine: dict[str, Any] | None = None,
            ip: str | None = None, keepalive_s: float | None = None, verdict=None) -> dict[str, Any] | None:
    """Record a progress step derived from logs or installer events, if it moves the machine's
    timeline forward (or, with ``keepalive_s``, if the install has been silent that long: log
    lines are a sign of life, so a chatty install is never marked stalled). The machine must be
    installing or queued; the install token is the one in the store (the caller has already
    attributed the source to this machine; the store still checks that ``ip`` speaks for it, with
    ``verdict`` from bastion_app.binding). Returns the updated machine, or None if nothing was
    recorded."""
    from bastion_app.binding import Claim
    from bastion_app.store import StoreError
    from labcore.lifecycle import INSTALL_TOKEN_STATES, IllegalTransition

    m = machine or store.get(mac)
    if m is None or m["state"] not in INSTALL_TOKEN_STATES or not m["install_token"]:
        return None
    if step is None or not timeline.advances(m["stage"], m["percent"], step):
        if keepalive_s is None:
            return None
        last = m["last_progress_at"] or m["install_started_at"] or m["state_changed_at"]
        if time.time() - last < keepalive_s:
            return None
        step = timeline.Progress(m["stage"] or "pxe", None, "installer is alive (log lines arriving)")
    try:
        return store.progress(mac, token=m["install_token"], stage=step.stage, percent=step.percent,
                              message=step.message[:2048], ip=ip, verdict=verdict or Claim.UNKNOWN)
    except (StoreError, IllegalTransition):
        return None  # the install ended or changed meanwhile
