"""The hub's side of a bastion: replication in, acknowledgements out.

The bastion sends ``{"type": "replicate", "events": [...], "machines": [...], "deleted": [...],
"head": {"event": E, "change": C}}``: events by their id in the bastion's events table, machine
rows (the bastion's machine view, never an install token) and forgotten MACs, each with the
bastion's change counter (``change``). labd stores the batch in one transaction and only then
answers ``{"type": "ack", "event": <highest event id stored>, "change": <highest change stored>}``.

Idempotent: an event is stored once per (bastion, id) (ON CONFLICT DO NOTHING); a machine row only
replaces an older version of itself (change counter); a batch sent twice changes nothing.

Agent join tokens: ``{"type": "agent_token", "mac": M, "hostname": H, "ref": R}`` asks for a join
token of kind agent for a machine the bastion installs (docs/agent.md, "Installed machines"):
scoped to ``<the bastion's cloud>/<environment>/H``, one use, ``install_agent_token_seconds`` of
life, with labd's CA pin; only for a MAC this bastion has replicated under that host name.
Answer ``{"type": "agent_token", "mac", "ref", "token"}`` or ``{..., "error"}``; an audit row each.

Ownership: each bastion's view of a MAC is kept in ``server_claims`` (mac, bastion). The row in
``servers`` belongs to one bastion (``servers.bastion``), the first that reported the MAC (or a
server an operator made by hand, without a bastion); a bastion's rows never change a server that
another bastion owns: the MAC is then a conflict, which labd shows (two claims) and which a
routed command must settle with ``--bastion``.

Logs (``logs`` commands, labd/link_api.py): the bastion sends the lines and progress as
``output`` messages (streams log|progress|state|end), stored as command_output rows like an
agent's command output; a logs command the API cancelled gets a ``cancel`` message (the bastion
stops its follow); one still running when its bastion disconnects fails ("the bastion
disconnected"; labctl asks again).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re

import pydantic
from psycopg.types.json import Jsonb

from labcore import schemas
from labcore import validate as v
from labd.hub.core import Peer, PeerHandler
from labd.store import audit

log = logging.getLogger("labd.hub")

#: the most items of one kind in one replicate message (the bastion sends fewer)
MAX_BATCH = 2000
_COLUMNS = [n for n in schemas.MachineView.model_fields]
_JSON = ("ssh_keys", "hardware")


def _machine(raw) -> dict | None:
    try:
        m = schemas.MachineView.model_validate(raw).model_dump()
        m["mac"] = v.mac(m["mac"])
        change = int(raw["change"])
    except (pydantic.ValidationError, v.ValidationError, KeyError, TypeError, ValueError):
        return None
    if m["hostname"] is not None:
        try:
            m["hostname"] = v.hostname(m["hostname"])
        except v.ValidationError:
            return None
    m["change"] = change
    return m


def _event(raw) -> tuple | None:
    try:
        eid = int(raw["id"])
        mac = v.mac(raw["mac"])
        kind = str(raw["kind"])[:64]
    except (KeyError, TypeError, ValueError, v.ValidationError):
        return None
    if eid < 1:
        return None
    body = {k: raw.get(k) for k in ("actor", "from_state", "to_state", "reason", "data")}
    return eid, mac, str(raw.get("ts", ""))[:40], kind, json.dumps(body)[:65536]


#: the streams of a logs command's output (bastion_app/follow.py's timeline items)
LOG_STREAMS = ("log", "progress", "state", "end")


class BastionHandler(PeerHandler):
    kind = "bastion"
    table = "bastions"
    streams = LOG_STREAMS

    def __init__(self, hub):
        super().__init__(hub)
        self._cancels_sent: set[str] = set()
        self._watch: asyncio.Task | None = None

    async def on_connect(self, peer: Peer) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_cancels())

    def offline(self, cur, peer: Peer) -> None:
        super().offline(cur, peer)
        cur.execute("UPDATE commands SET state = 'failed', updated_at = now(), result = %s WHERE target_kind = 'bastion' "
                    "AND target_id = %s AND kind = 'logs' AND state = 'sent'",
                    (Jsonb({"status": 503, "body": {"error": f"bastion {peer.name} disconnected"}}), peer.id))

    async def _watch_cancels(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            if not any(p.kind == "bastion" for p in self.hub.peers.values()):
                continue
            try:
                await self.send_cancels(self._cancels_sent)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.warning("hub: bastion cancel poll failed: %s", exc)

    async def on_message(self, peer: Peer, msg: dict) -> None:
        if msg.get("type") == "output":
            return await self.output(peer, msg)
        if msg.get("type") == "agent_token":
            return await self.on_agent_token(peer, msg)
        if msg.get("type") != "replicate":
            return await super().on_message(peer, msg)
        events = [e for e in map(_event, (msg.get("events") or [])[:MAX_BATCH]) if e]
        machines = [m for m in map(_machine, (msg.get("machines") or [])[:MAX_BATCH]) if m]
        deleted = []
        for d in (msg.get("deleted") or [])[:MAX_BATCH]:
            try:
                deleted.append((v.mac(d["mac"]), int(d["change"])))
            except (KeyError, TypeError, ValueError, v.ValidationError):
                continue
        bad = (len(msg.get("events") or []) - len(events)) + (len(msg.get("machines") or []) - len(machines))
        head = msg.get("head") or {}
        ack = await self.hub.db(lambda cur: self.store_batch(cur, peer, events, machines, deleted, head, bad))
        await peer.send({"type": "ack", **ack})

    def store_batch(self, cur, peer: Peer, events, machines, deleted, head, bad) -> dict:
        name = peer.name
        if events:
            cur.executemany("INSERT INTO bastion_events (bastion, event_id, mac, ts, kind, body) VALUES (%s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT (bastion, event_id) DO NOTHING", [(name, *e) for e in events])
        if machines:
            self._upsert(cur, peer, machines)
        for mac, change in deleted:
            cur.execute("DELETE FROM server_claims WHERE mac = %s AND bastion = %s AND version < %s", (mac, name, change))
            cur.execute("DELETE FROM servers WHERE mac = %s AND bastion = %s AND COALESCE(bastion_version, 0) < %s",
                        (mac, name, change))
        max_event = max((e[0] for e in events), default=0)
        max_change = max([m["change"] for m in machines] + [c for _, c in deleted], default=0)
        try:
            head_event = int(head.get("event", 0))
        except (TypeError, ValueError):
            head_event = 0
        row = cur.execute(
            "UPDATE bastions SET acked_event_id = GREATEST(acked_event_id, %s), acked_change = GREATEST(acked_change, %s), "
            "last_seen_at = now(), status = 'online' WHERE id = %s RETURNING acked_event_id, acked_change",
            (max_event, max_change, peer.id)).fetchone()
        cur.execute("UPDATE bastions SET backlog = GREATEST(0, %s - acked_event_id) WHERE id = %s", (head_event, peer.id))
        if machines or deleted:
            cur.execute("UPDATE bastions SET machines = (SELECT count(*) FROM server_claims WHERE bastion = %s) WHERE id = %s",
                        (name, peer.id))
        if bad:
            audit(cur, f"bastion:{peer.id}", "bastions.replicate", f"bastions/{peer.id}", outcome="rejected", status=422,
                  detail={"invalid_items": bad})
        # the acknowledgement names what this batch stored: the bastion advances to it
        return {"event": max_event, "change": max_change,
                "acked_event": row["acked_event_id"] if row else 0, "acked_change": row["acked_change"] if row else 0}

    def _upsert(self, cur, peer: Peer, machines: list[dict]) -> None:
        """A batch of this bastion's machine rows: its claims, then the servers it owns (a few
        statements per batch, each pipelined: not one round trip per machine)."""
        name = peer.name
        latest: dict[str, dict] = {}
        for m in machines:  # a MAC twice in one batch: the newer row
            if m["mac"] not in latest or latest[m["mac"]]["change"] < m["change"]:
                latest[m["mac"]] = m
        rows = list(latest.values())
        cur.executemany("INSERT INTO server_claims (mac, bastion, version, row) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (mac, bastion) DO UPDATE SET version = excluded.version, row = excluded.row, "
                        "updated_at = now() WHERE server_claims.version < excluded.version",
                        [(m["mac"], name, m["change"], Jsonb({k: m[k] for k in _COLUMNS})) for m in rows])
        macs = [m["mac"] for m in rows]
        owners = {r["mac"]: r for r in cur.execute("SELECT mac, bastion, bastion_version FROM servers WHERE mac = ANY(%s)",
                                                    (macs,)).fetchall()}
        names = [m["hostname"] for m in rows if m["hostname"]]
        taken = {r["hostname"]: r["mac"] for r in cur.execute(
            "SELECT hostname, mac FROM servers WHERE hostname = ANY(%s)", (names,)).fetchall()} if names else {}
        cols = [c for c in _COLUMNS if c != "mac"]
        inserts, updates = [], []
        for m in rows:
            values = [Jsonb(m[c]) if c in _JSON else m[c] for c in cols]
            if m["hostname"] and taken.get(m["hostname"], m["mac"]) != m["mac"]:
                values[cols.index("hostname")] = None  # another server has this name: not copied (the claim keeps it)
            own = owners.get(m["mac"])
            if own is None:
                inserts.append([m["mac"], *values, name, m["change"], peer.cloud, peer.environment])
            elif own["bastion"] in (None, name) and (own["bastion_version"] or 0) < m["change"]:
                updates.append([*values, name, m["change"], m["mac"], name])
            # else: another bastion owns this MAC (a conflict, visible as two claims) or this is older
        if inserts:
            cur.executemany(f"INSERT INTO servers (mac, {', '.join(cols)}, bastion, bastion_version, cloud, environment) "
                            f"VALUES (%s, {', '.join(['%s'] * len(cols))}, %s, %s, %s, %s) ON CONFLICT (mac) DO NOTHING",
                            inserts)
        if updates:
            sets = ", ".join(f"{c} = %s" for c in cols)
            cur.executemany(f"UPDATE servers SET {sets}, bastion = %s, bastion_version = %s WHERE mac = %s "
                            "AND (bastion IS NULL OR bastion = %s)", updates)

    # -- join tokens for the agents of machines the bastion installs ----------------------------------
    async def on_agent_token(self, peer: Peer, msg: dict) -> None:
        ref = str(msg.get("ref", ""))
        if not re.fullmatch(r"[0-9a-f]{1,64}", ref):
            return
        try:
            mac, hostname = v.mac(str(msg.get("mac", ""))), v.hostname(str(msg.get("hostname", "")))
        except v.ValidationError as exc:
            await peer.send({"type": "agent_token", "ref": ref, "mac": str(msg.get("mac", ""))[:32],
                             "error": exc.message})
            return
        out = await self.hub.db(lambda cur: self.make_agent_token(cur, peer, mac, hostname))
        await peer.send({"type": "agent_token", "ref": ref, "mac": mac, **out})

    def make_agent_token(self, cur, peer: Peer, mac: str, hostname: str) -> dict:
        from labcore.enroll import fingerprint, format_join
        from labd import auth

        claim = cur.execute("SELECT row FROM server_claims WHERE mac = %s AND bastion = %s", (mac, peer.name)).fetchone()
        actor, target = f"bastion:{peer.id}", f"servers/{mac}"
        if claim is None or (claim["row"] or {}).get("hostname") != hostname:
            error = (f"bastion {peer.name} has not reported {mac} as {hostname} (yet)" if claim else
                     f"bastion {peer.name} has not reported {mac}")
            audit(cur, actor, "tokens.create", target, outcome="denied", status=404, detail={"reason": error, "kind": "agent"})
            return {"error": error}
        scope = f"{peer.cloud}/{peer.environment}/{hostname}"
        secret = auth.new_token("agent")
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.hub.cfg.install_agent_token_seconds)
        row = cur.execute("INSERT INTO tokens (kind, hash, username, scope, uses_left, expires_at, created_by) VALUES "
                          "('agent', %s, NULL, %s, 1, %s, %s) RETURNING id",
                          (auth.token_hash(secret), scope, expires, actor)).fetchone()
        audit(cur, actor, "tokens.create", target, status=201,
              detail={"token": str(row["id"]), "kind": "agent", "scope": scope, "for": "install"})
        return {"token": format_join(secret, fingerprint(self.hub.cfg.ca_path.read_bytes())),
                "expires_at": expires.isoformat().replace("+00:00", "Z")}
