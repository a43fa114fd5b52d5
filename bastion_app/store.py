"""The bastion's state store: SQLite in the data directory.

One module owns the database. Every change is one IMMEDIATE transaction that reads the machine,
asks :mod:`labcore.lifecycle` whether the action is allowed, writes the row and records an event
(who, when, from, to, why). WAL mode and a busy timeout make it safe for several gunicorn workers
and the syslog listener at once: no state lives in a process that another one needs.

This class is the one storage interface; labd (later) implements the same methods on PostgreSQL.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bastion_app.binding import Claim, accepts
from bastion_app.db import Database, StorageUnavailable, StoreError  # noqa: F401 - re-exported
from labcore.lifecycle import (
    INSTALL_PARAMS,
    INSTALL_TOKEN_STATES,
    Action,
    IllegalTransition,
    State,
    changed_params,
    describe_changes,
    transition,
)
from labcore.validate import new_token

#: Each migration is a list of statements, applied in one transaction; user_version counts them.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE machines (
            mac TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            hostname TEXT,
            role TEXT,
            os TEXT,
            disk TEXT NOT NULL DEFAULT '',
            ssh_keys TEXT NOT NULL DEFAULT '[]',
            ip TEXT,
            hardware TEXT NOT NULL DEFAULT '{}',
            install_token TEXT,
            debug_mode TEXT,
            stage TEXT,
            percent INTEGER,
            message TEXT,
            failure TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            state_changed_at REAL NOT NULL,
            last_seen_at REAL,
            install_started_at REAL,
            last_progress_at REAL,
            installed_at REAL,
            version INTEGER NOT NULL DEFAULT 1
        )""",
        "CREATE UNIQUE INDEX machines_hostname ON machines(hostname) WHERE hostname IS NOT NULL",
        "CREATE INDEX machines_state ON machines(state)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            mac TEXT NOT NULL,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            kind TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT,
            reason TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX events_mac ON events(mac, id)",
    ],
    [
        # the address an install is bound to (bastion_app.binding): set when the install script is
        # served, cleared when the install ends or is queued again
        "ALTER TABLE machines ADD COLUMN install_ip TEXT",
        # the bytes of stored hardware reports, kept by triggers (a bound needs no table scan)
        "CREATE TABLE totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO totals(name, value) SELECT 'hardware_bytes', COALESCE(sum(length(hardware)), 0) FROM machines",
        """CREATE TRIGGER machines_hardware_insert AFTER INSERT ON machines BEGIN
            UPDATE totals SET value = value + length(NEW.hardware) WHERE name = 'hardware_bytes'; END""",
        """CREATE TRIGGER machines_hardware_update AFTER UPDATE OF hardware ON machines BEGIN
            UPDATE totals SET value = value + length(NEW.hardware) - length(OLD.hardware) WHERE name = 'hardware_bytes'; END""",
        """CREATE TRIGGER machines_hardware_delete AFTER DELETE ON machines BEGIN
            UPDATE totals SET value = value - length(OLD.hardware) WHERE name = 'hardware_bytes'; END""",
    ],
    [
        # a machine's BMC (bastion_app.power): credentials sealed with labcore.secretbox (never in
        # clear); address NULL = seen by discovery, not configured yet
        """CREATE TABLE bmc (
            mac TEXT PRIMARY KEY,
            driver TEXT NOT NULL,
            address TEXT,
            system_id TEXT,
            verify_tls INTEGER NOT NULL DEFAULT 1,
            credentials TEXT,
            source TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ],
    [
        # the link to labd (bastion_app/link.py): a change counter for machine rows, tombstones of
        # forgotten ones, what labd acknowledged, and the ids of commands applied (at most once)
        "ALTER TABLE machines ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE link_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO link_state(name, value) VALUES ('change_seq', 0), ('acked_event', 0), ('acked_change', 0)",
        "UPDATE machines SET change_seq = rowid",
        "UPDATE link_state SET value = (SELECT COALESCE(max(rowid), 0) FROM machines) WHERE name = 'change_seq'",
        "CREATE INDEX machines_change ON machines(change_seq)",
        "CREATE TABLE machine_tombstones (mac TEXT PRIMARY KEY, change_seq INTEGER NOT NULL)",
        """CREATE TRIGGER machines_change_insert AFTER INSERT ON machines BEGIN
            UPDATE link_state SET value = value + 1 WHERE name = 'change_seq';
            UPDATE machines SET change_seq = (SELECT value FROM link_state WHERE name = 'change_seq') WHERE mac = NEW.mac;
            DELETE FROM machine_tombstones WHERE mac = NEW.mac; END""",
        """CREATE TRIGGER machines_change_update AFTER UPDATE ON machines WHEN NEW.change_seq = OLD.change_seq BEGIN
            UPDATE link_state SET value = value + 1 WHERE name = 'change_seq';
            UPDATE machines SET change_seq = (SELECT value FROM link_state WHERE name = 'change_seq') WHERE mac = NEW.mac; END""",
        """CREATE TRIGGER machines_change_delete AFTER DELETE ON machines BEGIN
            UPDATE link_state SET value = value + 1 WHERE name = 'change_seq';
            INSERT OR REPLACE INTO machine_tombstones(mac, change_seq)
                VALUES (OLD.mac, (SELECT value FROM link_state WHERE name = 'change_seq')); END""",
        "CREATE TABLE link_commands (id TEXT PRIMARY KEY, ts REAL NOT NULL, status INTEGER, body TEXT)",
    ],
    [
        # the join token labd made for the agent of a machine being installed (docs/agent.md): one
        # per install (keyed by its install token), asked for by the link, put into the install
        # script; gone with the install token (the install ended, was cancelled or queued again)
        """CREATE TABLE agent_tokens (
            mac TEXT PRIMARY KEY,
            install_token TEXT NOT NULL,
            ref TEXT NOT NULL,
            asked_at REAL NOT NULL,
            token TEXT,
            error TEXT
        )""",
        """CREATE TRIGGER agent_tokens_install_end AFTER UPDATE OF install_token ON machines
            WHEN NEW.install_token IS NOT OLD.install_token BEGIN
            DELETE FROM agent_tokens WHERE mac = NEW.mac; END""",
        """CREATE TRIGGER agent_tokens_machine_gone AFTER DELETE ON machines BEGIN
            DELETE FROM agent_tokens WHERE mac = OLD.mac; END""",
    ],
]

_JSON_COLUMNS = ("ssh_keys", "hardware")
_INSTALL_FIELDS = ("hostname", "role", "os", "disk", "ssh_keys")


def _changed(row: dict[str, Any] | None, params: dict[str, Any]) -> dict[str, Any]:
    """The event data of a (re)queue: ``{"changed": {param: [before, after]}}``, or ``{}``."""
    diff = changed_params(row, params)
    return {"changed": diff} if diff else {}


def _requeue_reason(base: str, row: dict[str, Any] | None, params: dict[str, Any]) -> str:
    diff = describe_changes(changed_params(row, params))
    return f"{base}; {diff}" if diff else base


class NotFound(StoreError):
    status = 404
    code = "not_found"


class Conflict(StoreError):
    status = 409
    code = "conflict"


class Forbidden(StoreError):
    status = 403
    code = "forbidden"


class AlreadyApplied(StoreError):
    """A command from labd whose id is recorded already: it is not applied again."""

    status = 409
    code = "already_applied"


class Full(StoreError):
    """The store takes no more of something a machine sends (machines, hardware bytes)."""

    status = 503
    code = "full"


#: the one answer to a machine-facing request that names an install: the same whether the MAC is
#: unknown, has no install, or the token or the address is wrong (nothing tells which MACs exist)
NOT_ACCEPTED = "not accepted: no install of this MAC with this token from this address"
#: the answer to a discovery report about a known machine from an address that does not speak for
#: it, or during its install
REPORT_REFUSED = "report not accepted: this machine is known at another address, or it is installing"


class Store(Database):
    def __init__(self, path: str | Path, *, synchronous: str = "FULL", busy_timeout_s: float = 30.0):
        super().__init__(path, synchronous=synchronous, busy_timeout_s=busy_timeout_s, queue_writers=True)
        self.migrate()
        self.creating = False

    @contextmanager
    def tx(self):
        """A write transaction; while :meth:`applying` a command from labd, its id is recorded in
        the first one (the command's effect): a command is applied at most once."""
        command = getattr(self._local, "command", None)
        with super().tx() as c:
            if command is not None:
                try:
                    c.execute("INSERT INTO link_commands(id, ts) VALUES (?, ?)", (command, time.time()))
                except sqlite3.IntegrityError:
                    raise AlreadyApplied(f"command {command} was applied already") from None
            yield c
        if command is not None:
            self._local.command = None

    @contextmanager
    def applying(self, command_id: str):
        """Within this block (this thread), the next write transaction records ``command_id``."""
        self._local.command = command_id
        try:
            yield
        finally:
            self._local.command = None

    def command_result(self, command_id: str) -> tuple[bool, int | None, Any]:
        """(applied?, status, body) of a command from labd."""
        row = self.conn().execute("SELECT status, body FROM link_commands WHERE id=?", (command_id,)).fetchone()
        if row is None:
            return False, None, None
        return True, row[0], json.loads(row[1]) if row[1] is not None else None

    def store_command_result(self, command_id: str, status: int, body: Any) -> None:
        with self.tx() as c:
            c.execute("UPDATE link_commands SET status=?, body=? WHERE id=?", (status, json.dumps(body), command_id))

    # -- replication to labd (bastion_app/link.py) ----------------------------------------------
    def link_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn().execute("SELECT name, value FROM link_state")}

    def link_ack(self, event: int, change: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE link_state SET value = max(value, ?) WHERE name = 'acked_event'", (event,))
            c.execute("UPDATE link_state SET value = max(value, ?) WHERE name = 'acked_change'", (change,))

    def changes_after(self, change: int, limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(machine rows, tombstones) with a change counter above ``change``, the ``limit`` lowest,
        read in one snapshot."""
        c = self.conn()
        c.execute("BEGIN")
        try:
            keys = c.execute(
                "SELECT mac, change_seq, 0 AS gone FROM machines WHERE change_seq > ? UNION ALL "
                "SELECT mac, change_seq, 1 FROM machine_tombstones WHERE change_seq > ? ORDER BY change_seq LIMIT ?",
                (change, change, limit)).fetchall()
            gone = [{"mac": k[0], "change": k[1]} for k in keys if k[2]]
            live = [k[0] for k in keys if not k[2]]
            rows = []
            for i in range(0, len(live), 500):
                part = live[i:i + 500]
                rows += [self._row(r) for r in c.execute(
                    f"SELECT * FROM machines WHERE mac IN ({','.join('?' * len(part))})", part).fetchall()]
        finally:
            c.execute("COMMIT")
        return rows, gone

    # -- agent join tokens for installs (bastion_app/link.py asks labd; installers.py uses them) ----
    def agent_tokens_wanted(self, *, retry_s: float, limit: int = 50, now: float | None = None) -> list[dict[str, Any]]:
        """Installs (queued or running, with a host name) labd knows of (their row acknowledged)
        that have no agent token yet and were not asked for within ``retry_s``: mac, hostname,
        install_token."""
        now = time.time() if now is None else now
        rows = self.conn().execute(
            "SELECT m.mac, m.hostname, m.install_token FROM machines m LEFT JOIN agent_tokens a ON a.mac = m.mac "
            "WHERE m.state IN (?, ?) AND m.hostname IS NOT NULL AND m.install_token IS NOT NULL "
            "AND m.change_seq <= (SELECT value FROM link_state WHERE name = 'acked_change') "
            "AND (a.mac IS NULL OR a.install_token != m.install_token OR (a.token IS NULL AND a.asked_at < ?)) "
            "ORDER BY m.change_seq LIMIT ?",
            (State.INSTALL_QUEUED.value, State.INSTALLING.value, now - retry_s, limit)).fetchall()
        return [{"mac": r[0], "hostname": r[1], "install_token": r[2]} for r in rows]

    def agent_token_asked(self, mac: str, install_token: str, ref: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO agent_tokens(mac, install_token, ref, asked_at) VALUES (?, ?, ?, ?)",
                      (mac, install_token, ref, time.time()))

    def agent_token_answer(self, mac: str, ref: str, *, token: str | None, error: str | None) -> bool:
        """labd's answer to the request ``ref``; False when that install is gone or asked again."""
        with self.tx() as c:
            return c.execute("UPDATE agent_tokens SET token = ?, error = ? WHERE mac = ? AND ref = ?",
                             (token, None if token else (error or "no token")[:500], mac, ref)).rowcount == 1

    def agent_token(self, mac: str, install_token: str) -> str | None:
        """The agent join token of this install, if labd gave one."""
        row = self.conn().execute("SELECT token FROM agent_tokens WHERE mac = ? AND install_token = ?",
                                  (mac, install_token)).fetchone()
        return row[0] if row else None

    @classmethod
    def from_config(cls, cfg) -> Store:
        """The bastion's state store: ``db_path`` with ``db_synchronous``."""
        return cls(cfg.db_path, synchronous=cfg.db_synchronous)

    def migrate(self) -> int:
        if self.path.exists() and self.schema_version() == len(MIGRATIONS):
            return len(MIGRATIONS)  # current: no write needed (a read-only data dir still starts)
        with self.tx() as c:
            current = c.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {current}, newer than this bastion ({len(MIGRATIONS)}): upgrade lab-platform"
                )
            for version in range(current, len(MIGRATIONS)):
                for stmt in MIGRATIONS[version]:
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version={version + 1}")
            return len(MIGRATIONS)

    # -- reads -------------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        d = dict(row)
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] else ([] if k == "ssh_keys" else {})
        return d

    def get(self, mac: str) -> dict[str, Any] | None:
        return self._row(self.conn().execute("SELECT * FROM machines WHERE mac=?", (mac,)).fetchone())

    def require(self, mac: str) -> dict[str, Any]:
        m = self.get(mac)
        if m is None:
            raise NotFound(f"no machine with MAC {mac}")
        return m

    def list(self, *, state: str | None = None, role: str | None = None, os: str | None = None,
             after: tuple[str | None, str] | None = None, limit: int | None = None,
             max_bytes: int | None = None) -> list[dict[str, Any]]:
        """Machines by host name (those without one last), then MAC; ``after`` = (hostname, mac) of
        the last machine of the previous page, ``limit`` the page size (a keyset page: no offset).
        ``max_bytes`` ends the page early, after the machine whose hardware reports reach it (rows
        are read one at a time, so a page's memory is bounded however large the store is)."""
        sql, args = "SELECT * FROM machines", []
        where = []
        for col, val in (("state", state), ("role", role), ("os", os)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        if after is not None:
            where.append("(hostname IS NULL, COALESCE(hostname, ''), mac) > (?, ?, ?)")
            args += [after[0] is None, after[0] or "", after[1]]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY hostname IS NULL, hostname, mac"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        out, size = [], 0
        for r in self.conn().execute(sql, args):
            out.append(self._row(r))
            size += len(r["hardware"])
            if max_bytes is not None and size >= max_bytes:
                break
        return out  # type: ignore[return-value]

    #: the columns of a machine list's row (:meth:`summary_page`): no hardware report, no token
    SUMMARY_COLUMNS = ("mac", "hostname", "state", "role", "os", "ip", "stage", "percent", "failure", "updated_at")

    def summary_page(self, *, state: str | None = None, role: str | None = None, os: str | None = None,
                     sort: str = "hostname", descending: bool = False, offset: int = 0,
                     limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """One page of machines as a list shows them (:data:`SUMMARY_COLUMNS` only, so a page costs
        no JSON parsing), sorted by one of those columns (then MAC), and how many match in all."""
        if sort not in self.SUMMARY_COLUMNS:
            raise ValueError(f"cannot sort by {sort!r}")
        where, args = [], []
        for col, val in (("state", state), ("role", role), ("os", os)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        order = "DESC" if descending else "ASC"
        c = self.conn()
        total = c.execute(f"SELECT count(*) FROM machines{cond}", args).fetchone()[0]
        rows = c.execute(f"SELECT {', '.join(self.SUMMARY_COLUMNS)} FROM machines{cond} "
                         f"ORDER BY {sort} IS NULL, {sort} {order}, mac {order} LIMIT ? OFFSET ?", [*args, limit, offset])
        return [dict(r) for r in rows], total

    def fingerprint(self) -> tuple[int, int, float]:
        """What changes whenever any machine does: the newest event id, the number of machines and
        the newest update time (a cheap ETag for a page that shows machines)."""
        n, updated = self.conn().execute("SELECT count(*), COALESCE(max(updated_at), 0) FROM machines").fetchone()
        return self.last_event_id(), n, updated

    def hardware_bytes(self) -> int:
        """The bytes of all stored hardware reports."""
        row = self.conn().execute("SELECT value FROM totals WHERE name='hardware_bytes'").fetchone()
        return row[0] if row else 0

    def count_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn().execute("SELECT state, count(*) FROM machines GROUP BY state")}

    def events(self, mac: str | None = None, *, since: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        if mac is None:
            rows = self.conn().execute("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", (since, limit))
        else:
            rows = self.conn().execute(
                "SELECT * FROM events WHERE mac=? AND id>? ORDER BY id LIMIT ?", (mac, since, limit)
            )
        out = []
        for r in rows:
            d = dict(r)
            d["data"] = json.loads(d["data"])
            out.append(d)
        return out

    def last_event_id(self) -> int:
        """The newest event id (0 with no events). Ids only grow, so a reader that remembers it
        can ask later what happened since (:meth:`macs_with_events`)."""
        return self.conn().execute("SELECT COALESCE(max(id), 0) FROM events").fetchone()[0]

    def macs_with_events(self, after: int, upto: int) -> set[str]:
        """The machines that have an event with ``after < id <= upto``: which followers to wake."""
        rows = self.conn().execute("SELECT DISTINCT mac FROM events WHERE id>? AND id<=?", (after, upto))
        return {r[0] for r in rows}

    def count_stalled(self) -> int:
        """How many machines are failed because their install stalled (no progress in time)."""
        return self.conn().execute("SELECT count(*) FROM machines WHERE failure='stalled' AND state='failed'").fetchone()[0]

    def macs_by_ip(self) -> dict[str, str]:
        """ip -> mac of every machine with a known address; where machines share an address, the
        one seen most recently wins."""
        rows = self.conn().execute(
            "SELECT ip, mac FROM machines WHERE ip IS NOT NULL ORDER BY COALESCE(last_seen_at, updated_at)").fetchall()
        return {r[0]: r[1] for r in rows}

    def mac_for_ip(self, ip: str) -> str | None:
        """The machine last seen at this address, or None."""
        row = self.conn().execute(
            "SELECT mac FROM machines WHERE ip=? ORDER BY COALESCE(last_seen_at, updated_at) DESC LIMIT 1", (ip,)).fetchone()
        return row[0] if row else None

    # -- the one path for changes ------------------------------------------------------------
    def _event(self, c, mac, actor, kind, from_state, to_state, reason="", data=None, now=None) -> int:
        cur = c.execute(
            "INSERT INTO events(mac, ts, actor, kind, from_state, to_state, reason, data) VALUES (?,?,?,?,?,?,?,?)",
            (mac, now or time.time(), actor, kind, from_state, to_state, reason, json.dumps(data or {})),
        )
        return cur.lastrowid

    def _apply(
        self,
        mac: str,
        action: Action,
        *,
        actor: str,
        reason: str | Callable[[dict[str, Any] | None], str] = "",
        changes: Callable[[dict[str, Any] | None, State], dict[str, Any]] | None = None,
        data: dict[str, Any] | Callable[[dict[str, Any] | None], dict[str, Any]] | None = None,
        check: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> dict[str, Any] | None:
        """Read, check the lifecycle table, write the row and its event: one transaction. ``reason``
        and ``data`` of the event may be functions of the row as it was before the change."""
        now = time.time()
        with self.tx() as c:
            row = self._row(c.execute("SELECT * FROM machines WHERE mac=?", (mac,)).fetchone())
            current = State(row["state"]) if row else State.UNKNOWN
            if row is None and action != Action.DISCOVER:
                raise NotFound(f"no machine with MAC {mac}")
            if check:
                check(row)
            new_state = transition(current, action)
            values = changes(row, new_state) if changes else {}
            if new_state == State.REMOVED:
                c.execute("DELETE FROM machines WHERE mac=?", (mac,))
            else:
                values = {**values, "state": new_state.value, "updated_at": now}
                if new_state != current:
                    values["state_changed_at"] = now
                for k in _JSON_COLUMNS:
                    if k in values:
                        values[k] = json.dumps(values[k])
                if row is None:
                    values.update(mac=mac, created_at=now)
                    cols = ", ".join(values)
                    c.execute(f"INSERT INTO machines({cols}) VALUES ({', '.join('?' * len(values))})", list(values.values()))
                else:
                    sets = ", ".join(f"{k}=?" for k in values)
                    try:
                        c.execute(f"UPDATE machines SET {sets}, version=version+1 WHERE mac=?", [*values.values(), mac])
                    except sqlite3.IntegrityError:
                        raise Conflict(f"host name {values.get('hostname')!r} is already used by another machine") from None
            if callable(reason):
                reason = reason(row)
            if callable(data):
                data = data(row)
            self._event(c, mac, actor, action.value, current.value, new_state.value, reason, data, now)
            return self._row(c.execute("SELECT * FROM machines WHERE mac=?", (mac,)).fetchone())

    def _check_hostname_free(self, c, mac: str, hostname: str) -> None:
        other = c.execute("SELECT mac FROM machines WHERE hostname=? AND mac<>?", (hostname, mac)).fetchone()
        if other:
            raise Conflict(f"host name {hostname!r} is already used by {other[0]}")

    # -- machine-facing ----------------------------------------------------------------------
    def discover(self, mac: str, hardware: dict[str, Any], *, ip: str | None, verdict: Claim = Claim.UNKNOWN,
                 max_machines: int | None = None, max_hardware_total: int | None = None,
                 actor: str = "machine") -> dict[str, Any]:
        """Record a discovery report: a new machine becomes discovered; a known one only has its
        hardware and address refreshed (its state does not change), and only from an address
        that speaks for it (``verdict``, else its recorded address) and not while it installs.
        ``max_machines`` and ``max_hardware_total`` (bytes of all reports) bound the store."""
        now = time.time()
        doc = json.dumps(hardware)

        def room(old: int, new_machine: bool) -> None:
            c = self.conn()
            if new_machine and max_machines is not None:
                if c.execute("SELECT count(*) FROM machines").fetchone()[0] >= max_machines:
                    raise Full(f"the bastion keeps at most {max_machines} machines (max_machines); forget some first")
            if max_hardware_total is not None and self.hardware_bytes() - old + len(doc) > max_hardware_total:
                raise Full(f"the bastion keeps at most {max_hardware_total} bytes of hardware reports "
                           "(max_hardware_total); forget some machines first")

        with self.tx() as c:
            row = c.execute("SELECT state, ip, length(hardware) FROM machines WHERE mac=?", (mac,)).fetchone()
            if row is not None:
                if State(row[0]) in INSTALL_TOKEN_STATES or not accepts(verdict, row[1], ip):
                    raise Forbidden(REPORT_REFUSED)
                room(row[2], False)
                c.execute(
                    "UPDATE machines SET hardware=?, ip=COALESCE(?, ip), last_seen_at=?, updated_at=?, version=version+1 WHERE mac=?",
                    (doc, ip, now, now, mac),
                )
                self._event(c, mac, actor, "hardware", row[0], row[0], "discovery report", {"ip": ip}, now)
                return self._row(c.execute("SELECT * FROM machines WHERE mac=?", (mac,)).fetchone())  # type: ignore[return-value]
        return self._apply(  # type: ignore[return-value]
            mac,
            Action.DISCOVER,
            actor=actor,
            reason="discovery report",
            changes=lambda row, st: {"hardware": hardware, "ip": ip, "last_seen_at": now},
            data={"ip": ip},
            check=lambda row: room(0, True),
        )

    def seen(self, mac: str, ip: str | None) -> None:
        """A known machine asked for its boot script from an address that speaks for it: remember
        when and from where (no event)."""
        now = time.time()
        with self.tx() as c:
            c.execute("UPDATE machines SET last_seen_at=?, ip=COALESCE(?, ip) WHERE mac=?", (now, ip, mac))

    def start_install(self, mac: str, *, ip: str | None, verdict: Claim = Claim.UNKNOWN) -> dict[str, Any]:
        """The machine fetched its install boot script: install_queued -> installing, and the
        install is bound to ``ip`` (Forbidden if another address is bound and ``verdict`` does not
        say this one is the machine's)."""
        now = time.time()

        def check(row):
            if row is not None and not accepts(verdict, row["install_ip"], ip):
                raise Forbidden(NOT_ACCEPTED)

        def changes(row, st):
            out = {"last_seen_at": now, "ip": ip or row["ip"], "install_ip": ip, "stage": "pxe", "percent": 0,
                   "message": "install boot script served", "last_progress_at": now}
            if row["state"] == State.INSTALL_QUEUED:
                out["install_started_at"] = now
            return out

        return self._apply(mac, Action.START, actor="machine", reason="install boot script served", changes=changes,  # type: ignore[return-value]
                           check=check, data={"ip": ip})

    def check_install_token(self, row: dict[str, Any] | None, token: str, *, ip: str | None, verdict: Claim) -> None:
        """The machine-facing check: an install in progress, its token, from its address. Every
        failure is the same Forbidden(NOT_ACCEPTED)."""
        if (row is None or State(row["state"]) not in INSTALL_TOKEN_STATES or not row["install_token"]
                or not secrets.compare_digest(row["install_token"], token) or not accepts(verdict, row["install_ip"], ip)):
            raise Forbidden(NOT_ACCEPTED)

    def progress(self, mac: str, *, token: str, stage: str, percent: int | None, message: str, ip: str | None,
                 verdict: Claim = Claim.UNKNOWN) -> dict[str, Any]:
        """A progress report from the installer; 'complete' and 'failed' end the install."""
        now = time.time()
        action = {"complete": Action.COMPLETE, "failed": Action.FAIL, "error": Action.FAIL}.get(stage, Action.PROGRESS)

        def changes(row, st):
            out: dict[str, Any] = {
                "stage": stage,
                "message": message,
                "last_progress_at": now,
                "last_seen_at": now,
                "ip": ip or row["ip"],
                "install_ip": ip or row["install_ip"],
            }
            if percent is not None:
                out["percent"] = percent
            if row["install_started_at"] is None:
                out["install_started_at"] = now
            if action == Action.COMPLETE:
                out.update(percent=100, installed_at=now, install_token=None, install_ip=None, failure=None)
            elif action == Action.FAIL:
                out.update(failure=message or "installer reported failure", install_token=None, install_ip=None)
            return out

        return self._apply(  # type: ignore[return-value]
            mac,
            action,
            actor="machine",
            reason=message[:200],
            changes=changes,
            data={"stage": stage, "percent": percent, "message": message, "ip": ip},
            check=lambda row: self.check_install_token(row, token, ip=ip, verdict=verdict),
        )

    def take_debug(self, mac: str) -> str | None:
        """Atomically read and clear a pending one-shot debug boot."""
        with self.tx() as c:
            row = c.execute("SELECT debug_mode, state FROM machines WHERE mac=?", (mac,)).fetchone()
            if row is None or row["debug_mode"] is None:
                return None
            c.execute("UPDATE machines SET debug_mode=NULL, updated_at=?, version=version+1 WHERE mac=?", (time.time(), mac))
            self._event(c, mac, "machine", "debug_served", row["state"], row["state"], "one-shot debug boot served", {"mode": row["debug_mode"]})
            return row["debug_mode"]

    # -- operator ----------------------------------------------------------------------------
    def queue_install(self, mac: str, params: dict[str, Any], *, actor: str, reason: str = "") -> dict[str, Any]:
        def changes(row, st):
            return {
                **{k: params[k] for k in _INSTALL_FIELDS},
                "install_token": new_token(),
                "install_ip": None,
                "stage": "queued",
                "percent": 0,
                "message": "",
                "failure": None,
                "install_started_at": None,
                "last_progress_at": None,
            }

        def check(row):
            self._check_hostname_free(self.conn(), mac, params["hostname"])

        return self._apply(mac, Action.INSTALL, actor=actor, changes=changes, check=check,
                           reason=lambda row: _requeue_reason(reason or "install queued", row, params),
                           data=lambda row: {**{k: params[k] for k in INSTALL_PARAMS},
                                             **_changed(row, params)})  # type: ignore[return-value]

    def reprovision(self, mac: str, overrides: dict[str, Any], *, actor: str, reason: str = "") -> dict[str, Any]:
        def merged(row):
            return {k: (overrides[k] if overrides.get(k) is not None else row[k]) for k in _INSTALL_FIELDS}

        def changes(row, st):
            params = merged(row)
            if not params["hostname"] or not params["role"] or not params["os"]:
                raise Conflict("machine has no previous install parameters; use install instead")
            return {**params, "install_token": new_token(), "install_ip": None, "stage": "queued", "percent": 0, "message": "",
                    "failure": None, "install_started_at": None, "last_progress_at": None}

        def check(row):
            if overrides.get("hostname"):
                self._check_hostname_free(self.conn(), mac, overrides["hostname"])

        return self._apply(mac, Action.REPROVISION, actor=actor, changes=changes, check=check,
                           reason=lambda row: _requeue_reason(reason or "reprovision", row, merged(row)),
                           data=lambda row: {**{k: v for k, v in overrides.items() if v is not None and k != "ssh_keys"},
                                             **_changed(row, merged(row))})  # type: ignore[return-value]

    def cancel(self, mac: str, *, actor: str, reason: str = "") -> dict[str, Any]:
        return self._apply(mac, Action.CANCEL, actor=actor, reason=reason or "install cancelled",  # type: ignore[return-value]
                           changes=lambda row, st: {"install_token": None, "install_ip": None, "stage": None, "percent": None,
                                                    "message": None})

    def forget(self, mac: str, *, actor: str, reason: str = "") -> None:
        self._apply(mac, Action.FORGET, actor=actor, reason=reason or "forgotten")
        with self.tx() as c:
            c.execute("DELETE FROM bmc WHERE mac=?", (mac,))

    def request_debug(self, mac: str, mode: str, *, actor: str, reason: str = "") -> dict[str, Any]:
        with self.tx() as c:
            row = c.execute("SELECT state FROM machines WHERE mac=?", (mac,)).fetchone()
            if row is None:
                raise NotFound(f"no machine with MAC {mac}")
            c.execute("UPDATE machines SET debug_mode=?, updated_at=?, version=version+1 WHERE mac=?", (mode, time.time(), mac))
            self._event(c, mac, actor, "debug_requested", row[0], row[0], reason or f"one-shot {mode} boot requested", {"mode": mode})
        return self.require(mac)

    def mark_stalled(self, timeout_s: float, *, now: float | None = None) -> list[str]:
        """installing machines silent for longer than timeout_s become failed (reason: stalled)."""
        now = now or time.time()
        cutoff = now - timeout_s
        rows = self.conn().execute(
            "SELECT mac FROM machines WHERE state=? AND COALESCE(last_progress_at, install_started_at, state_changed_at) < ?",
            (State.INSTALLING.value, cutoff),
        ).fetchall()
        stalled = []
        for (mac,) in rows:
            def check(row):
                last = row["last_progress_at"] or row["install_started_at"] or row["state_changed_at"]
                if last >= cutoff:
                    raise Conflict("progress arrived meanwhile")
            try:
                self._apply(mac, Action.STALL, actor="bastion", reason=f"no progress for more than {int(timeout_s)} s",
                            changes=lambda row, st: {"failure": "stalled", "install_token": None, "install_ip": None,
                                                         "stage": "stalled"},
                            check=check)
                stalled.append(mac)
            except (Conflict, NotFound, IllegalTransition):
                pass
        return stalled

    # -- BMCs (bastion_app.power) ----------------------------------------------------------------
    def get_bmc(self, mac: str) -> dict[str, Any] | None:
        row = self.conn().execute("SELECT * FROM bmc WHERE mac=?", (mac,)).fetchone()
        return dict(row) if row else None

    def set_bmc(self, mac: str, record: dict[str, Any], *, actor: str, source: str = "operator") -> dict[str, Any]:
        """Record a machine's BMC (``record``: driver, address, system_id, verify_tls, credentials
        already sealed) and an event naming what changed, never the credentials. A discovery
        hint (source ``discovery``) never replaces what an operator set."""
        now = time.time()
        with self.tx() as c:
            row = c.execute("SELECT state FROM machines WHERE mac=?", (mac,)).fetchone()
            if row is None:
                raise NotFound(f"no machine with MAC {mac}")
            old = c.execute("SELECT source FROM bmc WHERE mac=?", (mac,)).fetchone()
            if source == "discovery" and old is not None and old[0] == "operator":
                return self.get_bmc(mac)  # type: ignore[return-value]
            values = {"mac": mac, "driver": record["driver"], "address": record.get("address"),
                      "system_id": record.get("system_id"), "verify_tls": int(record.get("verify_tls", True)),
                      "credentials": record.get("credentials"), "source": source, "updated_at": now}
            c.execute(f"INSERT OR REPLACE INTO bmc({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                      list(values.values()))
            shown = {k: values[k] for k in ("driver", "address", "system_id", "source")}
            self._event(c, mac, actor, "bmc_set", row[0], row[0], f"BMC {record['driver']} {record.get('address') or '(address unknown)'}",
                        shown, now)
        return self.get_bmc(mac)  # type: ignore[return-value]

    def delete_bmc(self, mac: str, *, actor: str) -> None:
        with self.tx() as c:
            row = c.execute("SELECT state FROM machines WHERE mac=?", (mac,)).fetchone()
            if row is None or c.execute("DELETE FROM bmc WHERE mac=?", (mac,)).rowcount == 0:
                raise NotFound(f"no BMC recorded for {mac}")
            self._event(c, mac, actor, "bmc_removed", row[0], row[0], "BMC removed")

    def power_events(self, results: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """BMC call results ``(mac, actor, reason, data)`` (bastion_app.power) on the machines'
        histories, in one transaction: a batch commits the calls that ended while its previous
        commit was written together (one sync to disk)."""
        with self.tx() as c:
            for mac, actor, reason, data in results:
                row = c.execute("SELECT state FROM machines WHERE mac=?", (mac,)).fetchone()
                state = row[0] if row else None
                self._event(c, mac, actor, "power", state, state, reason, data)

    # -- export / import of the seed's state.json shape --------------------------------------
    def export_state(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {"discovered": {}, "install_queue": {}, "installed": {}, "debug": {}}
        for m in self.list():
            common = {"hardware": m["hardware"], "ip": m["ip"], "first_seen": m["created_at"]}
            install = {k: m[k] for k in _INSTALL_FIELDS}
            if m["state"] == State.DISCOVERED:
                out["discovered"][m["mac"]] = common
            elif m["state"] in (State.INSTALL_QUEUED, State.INSTALLING, State.FAILED):
                out["install_queue"][m["mac"]] = {**common, **install, "status": m["state"], "token": m["install_token"],
                                                  "stage": m["stage"], "percent": m["percent"], "failure": m["failure"]}
            elif m["state"] == State.INSTALLED:
                out["installed"][m["mac"]] = {**common, **install, "installed_at": m["installed_at"]}
            if m["debug_mode"]:
                out["debug"][m["mac"]] = {"mode": m["debug_mode"]}
        return out

    def import_state(self, doc: dict[str, Any], *, actor: str, replace: bool = False) -> int:
        """Load a state.json document (already validated) in one transaction. Existing machines
        are an error unless replace=True. Returns the number of machines imported."""
        now = time.time()
        rows: dict[str, dict[str, Any]] = {}
        for section, default_state in (("discovered", State.DISCOVERED), ("install_queue", State.INSTALL_QUEUED), ("installed", State.INSTALLED)):
            for mac, entry in (doc.get(section) or {}).items():
                if mac in rows:
                    raise Conflict(f"{mac} appears in more than one section")
                state = State(entry.get("status") or default_state)
                row = {"mac": mac, "state": state.value, "hardware": entry.get("hardware") or {}, "ip": entry.get("ip"),
                       "created_at": entry.get("first_seen") or now, "updated_at": now, "state_changed_at": now}
                if section != "discovered":
                    row.update({k: entry.get(k) for k in _INSTALL_FIELDS})
                    row["disk"] = row["disk"] or ""
                    row["ssh_keys"] = row["ssh_keys"] or []
                if section == "install_queue":
                    row.update(install_token=entry.get("token") or (new_token() if state != State.FAILED else None),
                               stage=entry.get("stage") or "queued", percent=entry.get("percent") or 0, failure=entry.get("failure"))
                if section == "installed":
                    row["installed_at"] = entry.get("installed_at") or now
                rows[mac] = row
        for mac, entry in (doc.get("debug") or {}).items():
            if mac not in rows:
                raise Conflict(f"debug entry for {mac}, which is in no other section")
            rows[mac]["debug_mode"] = entry.get("mode") or "rescue"
        with self.tx() as c:
            for mac, row in rows.items():
                exists = c.execute("SELECT 1 FROM machines WHERE mac=?", (mac,)).fetchone()
                if exists and not replace:
                    raise Conflict(f"{mac} is already in the store (use --replace to overwrite)")
                if exists:
                    c.execute("DELETE FROM machines WHERE mac=?", (mac,))
                vals = {k: (json.dumps(v) if k in _JSON_COLUMNS else v) for k, v in row.items()}
                try:
                    c.execute(f"INSERT INTO machines({', '.join(vals)}) VALUES ({', '.join('?' * len(vals))})", list(vals.values()))
                except sqlite3.IntegrityError as exc:
                    raise Conflict(f"{mac}: {exc}") from None
                self._event(c, mac, actor, "import", None, row["state"], "imported from state.json", {}, now)
        return len(rows)


