"""The hub's side of an agent (issue 18), a :class:`~labd.hub.core.PeerHandler`.

The core authenticates the peer (certificate CN ``agent:<uuid>`` against labd's CA, the
certificate recorded and not revoked), negotiates the protocol, answers ``renew`` and delivers
queued commands. This handler keeps the agent's status and facts and takes its messages.
Everything an agent sends is attributed to the id of its certificate, never to a field of a
message, and touches only commands addressed to that id (``target_id`` in every statement).

Status (column ``agents.status``): ``pending`` (enrolled with a reusable or unscoped token; it may
connect and beat, but no command is created for it until ``labctl agent approve``), ``active``,
``offline`` (was active; disconnected or silent), ``revoked`` (refused at connect; a live link is
closed by the core's periodic check).

Heartbeats are batched: a ``heartbeat`` message changes memory only; on the core's beat (every
``core.HEARTBEAT_SECONDS``) one statement writes ``last_seen_at`` and the latest facts of the
agents connected here that beat since the previous one (so each agent's row is written at most
once per heartbeat interval, and all of them in one statement). Status changes (connect, disconnect) are written at once. An agent silent
for ``agent_missed_beats`` heartbeat intervals is disconnected (and so marked offline); the API
treats an agent whose stored ``last_seen_at`` is older than :func:`offline_after` as offline even
if no hub is left to mark it (a hub that died).

Commands to agents: ``exec`` and ``logs``. When a connection ends, its unfinished ``exec``
commands fail ("the agent disconnected": a command never runs twice) and a ``logs`` follow
(``deliver_after_reconnect``) is queued again with the cursor of the last journal entry stored and
the last sequence number, so the follow resumes where it stopped. A command the API turned to
``cancelled`` while it runs gets a ``cancel`` message. The agent's ``result`` (status
done|failed|cancelled, body with exit code, signal, user) ends the command; an exec's end writes an
audit row (argv, user, exit code; never the output).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging

from psycopg.types.json import Jsonb

from labd.hub.core import HEARTBEAT_SECONDS as HUB_BEAT_SECONDS
from labd.hub.core import Peer, PeerHandler, uuid_ok
from labd.store import audit

log = logging.getLogger("labd.hub.agent")

MAX_FACTS = 8192  # bytes of JSON per heartbeat
STREAMS = ("stdout", "stderr", "journal")
CLOSE_SILENT = 4005
RESULT_FIELDS = ("exit_code", "signal", "timed_out", "truncated_bytes", "user", "error")


def offline_after(heartbeat_seconds: float, missed_beats: int) -> float:
    """Seconds after the last beat stored in the database before an agent counts as offline: the
    missed beats plus one hub beat (the stored ``last_seen_at`` lags by up to one flush)."""
    return missed_beats * heartbeat_seconds + HUB_BEAT_SECONDS


def is_online(row: dict, heartbeat_seconds: float, missed_beats: int) -> bool:
    seen = row.get("last_seen_at")
    return (row.get("status") == "active" and seen is not None
            and (dt.datetime.now(dt.UTC) - seen).total_seconds() < offline_after(heartbeat_seconds, missed_beats))


class AgentHandler(PeerHandler):
    kind = "agent"
    table = "agents"
    streams = STREAMS

    def __init__(self, hub):
        super().__init__(hub)
        cfg = getattr(hub, "cfg", None)
        self.heartbeat_seconds = float(getattr(cfg, "agent_heartbeat_seconds", 15))
        self.missed_beats = int(getattr(cfg, "agent_missed_beats", 3))
        self._facts: dict[str, dict] = {}  # agent id -> facts of its latest beat (flushed by beat())
        self._last_beat: dict[str, float] = {}
        self._cancels_sent: set[str] = set()
        self._watch: asyncio.Task | None = None
        self.flushes = 0  # statements that wrote heartbeats (bench/agents.py reads it)

    # -- connection life (the core calls these) ---------------------------------------------------------
    def check(self, cur, peer_id: str):
        row = super().check(cur, peer_id)
        if isinstance(row, dict) and row["status"] == "revoked":
            return f"agent revoked at {row['revoked_at'].isoformat() if row.get('revoked_at') else '?'}: join again with a new token"
        return row

    def online(self, cur, peer: Peer) -> None:
        cur.execute("UPDATE agents SET status = CASE WHEN status = 'offline' THEN 'active' ELSE status END, "
                    "last_seen_at = now(), version = %s WHERE id = %s", (peer.software[:64], peer.id))
        self._settle(cur, peer.id)

    def offline(self, cur, peer: Peer) -> None:
        facts = self._facts.pop(peer.id, None)
        if facts is not None:
            cur.execute("UPDATE agents SET facts = %s WHERE id = %s", (Jsonb(facts), peer.id))
        cur.execute("UPDATE agents SET status = CASE WHEN status = 'active' THEN 'offline' ELSE status END, "
                    "last_seen_at = now() WHERE id = %s", (peer.id,))
        self._settle(cur, peer.id)

    @staticmethod
    def _settle(cur, agent_id: str) -> None:
        """Commands left 'sent' to an earlier connection: a follow is queued again to resume after its
        last stored entry; an exec fails (never run twice)."""
        cur.execute(
            "UPDATE commands c SET state = 'queued', updated_at = now(), args = c.args || jsonb_build_object("
            "'seq_base', o.seq, 'after_cursor', o.data->>'cursor') FROM (SELECT DISTINCT ON (command_id) command_id, seq, data "
            "FROM command_output WHERE command_id IN (SELECT id FROM commands WHERE target_kind = 'agent' AND target_id = %s "
            "AND state = 'sent' AND deliver_after_reconnect) ORDER BY command_id, seq DESC) o WHERE c.id = o.command_id",
            (agent_id,))
        cur.execute("UPDATE commands SET state = 'queued', updated_at = now() WHERE target_kind = 'agent' AND target_id = %s "
                    "AND state = 'sent' AND deliver_after_reconnect", (agent_id,))
        cur.execute("UPDATE commands SET state = 'failed', updated_at = now(), result = %s WHERE target_kind = 'agent' "
                    "AND target_id = %s AND state = 'sent'", (Jsonb({"error": "the agent disconnected"}), agent_id))

    async def on_connect(self, peer: Peer) -> None:
        self._last_beat[peer.id] = asyncio.get_running_loop().time()
        await peer.send({"type": "settings", "heartbeat_seconds": self.heartbeat_seconds})
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_cancels())

    async def on_disconnect(self, peer: Peer) -> None:
        if self.hub.peers.get(peer.id) is None:
            self._last_beat.pop(peer.id, None)

    # -- messages -----------------------------------------------------------------------------------------
    async def on_message(self, peer: Peer, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "heartbeat":
            facts = msg.get("facts")
            if isinstance(facts, dict) and len(json.dumps(facts)) <= MAX_FACTS:
                self._facts[peer.id] = facts
                self._last_beat[peer.id] = asyncio.get_running_loop().time()
        elif kind == "output":
            await self.output(peer, msg)
        else:
            await super().on_message(peer, msg)

    async def on_result(self, peer: Peer, msg: dict) -> None:
        cid, status, body = str(msg.get("id", "")), msg.get("status"), msg.get("body")
        if not uuid_ok(cid) or status not in ("done", "failed", "cancelled") or not isinstance(body, dict):
            return
        body = {k: body[k] for k in RESULT_FIELDS if k in body}

        def work(cur):
            row = cur.execute(
                "UPDATE commands SET state = CASE WHEN state = 'cancelled' THEN 'cancelled' ELSE %s END, result = %s, "
                "updated_at = now() WHERE id = %s AND target_kind = 'agent' AND target_id = %s AND state IN ('sent', 'cancelled') "
                "AND result IS NULL RETURNING kind, created_by, args, state", (status, Jsonb(body), cid, peer.id)).fetchone()
            if row is not None and row["kind"] == "exec":  # argv, user, exit code; never the output
                audit(cur, f"agent:{peer.id}", "agents.exec.result", f"commands/{cid}", status=200,
                      detail={"by": row["created_by"], "argv": row["args"].get("argv"), "user": body.get("user"),
                              "exit_code": body.get("exit_code"), "signal": body.get("signal"),
                              "timed_out": body.get("timed_out"), "state": row["state"]})
        await self.hub.db(work)
        self._cancels_sent.discard(cid)

    # -- batched heartbeats (the core's beat), cancels --------------------------------------------------------
    def beat(self, cur, ids: list[str]) -> None:
        """One statement for the agents connected here that sent a heartbeat since the last hub beat:
        their last_seen_at and facts (an agent that did not beat is not written)."""
        beats = [(i, self._facts.pop(i)) for i in ids if i in self._facts]
        if not beats:
            return
        cur.execute(
            "UPDATE agents AS a SET last_seen_at = now(), facts = v.facts::jsonb, "
            "status = CASE WHEN a.status = 'offline' THEN 'active' ELSE a.status END "
            "FROM (SELECT * FROM unnest(%s::uuid[], %s::text[]) AS t(id, facts)) AS v WHERE a.id = v.id",
            ([i for i, _ in beats], [json.dumps(f) for _, f in beats]))
        self.flushes += 1

    def silent(self, ids: list[str]) -> list[str]:
        """Agents connected here that missed their beats."""
        now = asyncio.get_running_loop().time()
        limit = self.missed_beats * self.heartbeat_seconds
        return [i for i in ids if now - self._last_beat.get(i, now) > limit]

    async def _watch_cancels(self, interval: float = 0.2) -> None:
        """Send ``cancel`` for running commands the API cancelled; close agents that went silent."""
        while True:
            await asyncio.sleep(interval)
            ids = [p.id for p in self.hub.peers.values() if p.kind == "agent"]
            if not ids:
                continue
            for i in self.silent(ids):
                peer = self.hub.peers.get(i)
                if peer is not None:
                    log.warning("hub: agent %s missed %s heartbeats; closing", i, self.missed_beats)
                    self._last_beat.pop(i, None)
                    await peer.ws.close(CLOSE_SILENT, "no heartbeat")
            try:  # no list of the connected agents in the query: recent cancels, filtered here
                await self.send_cancels(self._cancels_sent)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.warning("hub: agent cancel poll failed: %s", exc)

