"""The hub's agent side (issue 18): what labd does with the agents connected to this hub process.

The hub core (labd/hub/core.py) authenticates the peer (certificate CN ``agent:<uuid>``, checked
against labd's CA and the revocation list) and hands the connection to :class:`AgentPeers`:
:meth:`admit` (pending or revoked agents are turned away), :meth:`connected`, :meth:`handle` for
each message, :meth:`disconnected`. Everything an agent sends is attributed to the id of its
certificate, never to a field of the message, and it can only touch commands addressed to that
id (the in-flight set below, and ``target_id`` in every statement).

Writes are batched. A heartbeat changes memory only; every ``flush_seconds`` one statement writes
``last_seen_at`` and the facts of all agents that beat since the last flush. Status changes
(connect, disconnect, silence) are written at once. An agent is marked ``offline`` when it
disconnects, or after ``MISSED_BEATS`` heartbeat intervals without a beat (the hub closes its
connection); a sweep by any hub also marks agents offline whose ``last_seen_at`` is older than
``MISSED_BEATS`` intervals plus one flush (their hub died).

Commands (table ``commands``, ``target_kind = 'agent'``) are polled every ``poll_seconds``:
queued ones for agents connected here are sent; a sent one whose state the API turned to
``cancelled`` gets a ``cancel``. When a connection ends, its unfinished ``exec`` commands fail
("the agent disconnected": a command never runs twice) and a ``logs`` follow
(``deliver_after_reconnect``) is queued again, to resume after the last journal cursor stored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from psycopg.types.json import Jsonb

from labd.store import Store, audit

log = logging.getLogger("labd.hub.agent")

HEARTBEAT_SECONDS = 15.0  # lab-agent's default --heartbeat-seconds
MISSED_BEATS = 3
POLL_SECONDS = 0.2
MAX_FACTS = 8192  # bytes of JSON per heartbeat
MAX_OUTPUT_ROW = 64 * 1024
STREAMS = ("stdout", "stderr", "journal")
CLOSE_REVOKED, CLOSE_PENDING, CLOSE_SILENT = 4001, 4004, 4005


def offline_after(heartbeat_seconds: float, missed_beats: int) -> float:
    """Seconds after the last beat stored in the database before an agent counts as offline: the
    missed beats plus one flush interval (the stored ``last_seen_at`` lags by up to one flush)."""
    return (missed_beats + 1) * heartbeat_seconds


def is_online(row: dict, heartbeat_seconds: float, missed_beats: int) -> bool:
    seen = row.get("last_seen_at")
    return (row.get("status") == "active" and seen is not None
            and (dt.datetime.now(dt.UTC) - seen).total_seconds() < offline_after(heartbeat_seconds, missed_beats))


@dataclass
class Peer:
    id: str
    send: Callable[[dict], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    inflight: dict[str, str] = field(default_factory=dict)  # command id -> kind
    last_beat: float = 0.0


class AgentPeers:
    def __init__(self, store: Store, *, heartbeat_seconds: float = HEARTBEAT_SECONDS, missed_beats: int = MISSED_BEATS,
                 flush_seconds: float | None = None, poll_seconds: float = POLL_SECONDS):
        self.store = store
        self.heartbeat_seconds, self.missed_beats = heartbeat_seconds, missed_beats
        self.flush_seconds = flush_seconds or heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.peers: dict[str, Peer] = {}
        self._beats: dict[str, tuple[dt.datetime, dict]] = {}
        self.writes = 0  # statements that changed agents rows (the bench reads it)

    async def _tx(self, work):
        return await asyncio.to_thread(self.store.transaction, work)

    def silent_after(self) -> float:
        """Seconds without a beat after which an agent counts as offline (docs/agent.md)."""
        return self.missed_beats * self.heartbeat_seconds

    # -- connection life ------------------------------------------------------------------------------------
    async def admit(self, agent_id: str) -> tuple[int, str] | None:
        """None to accept, else (close code, reason)."""
        row = await self._tx(lambda cur: cur.execute("SELECT status FROM agents WHERE id = %s", (agent_id,)).fetchone())
        if row is None:
            return 4003, "unknown agent"
        if row["status"] == "revoked":
            return CLOSE_REVOKED, "agent revoked"
        if row["status"] == "pending":
            return CLOSE_PENDING, "pending approval (labctl agent approve)"
        return None

    async def connected(self, agent_id: str, software: str, send, close) -> None:
        loop = asyncio.get_running_loop()
        old = self.peers.get(agent_id)
        if old is not None:  # the same agent again (a reconnect the old socket has not noticed): keep the new one
            await old.close(1000, "replaced by a newer connection")
        self.peers[agent_id] = Peer(agent_id, send, close, last_beat=loop.time())
        await send({"type": "settings", "heartbeat_seconds": self.heartbeat_seconds})  # labd's interval is the one

        def work(cur):
            cur.execute("UPDATE agents SET status = 'active', last_seen_at = now(), version = %s "
                        "WHERE id = %s AND status IN ('active', 'offline')", (software[:64], agent_id))
            self._settle(cur, agent_id)
        await self._tx(work)
        self.writes += 1

    def _settle(self, cur, agent_id: str) -> None:
        """Commands left 'sent' by a previous connection: an exec fails, a follow is queued again."""
        cur.execute("UPDATE commands SET state = 'queued', updated_at = now() WHERE target_kind = 'agent' AND target_id = %s "
                    "AND state = 'sent' AND deliver_after_reconnect", (agent_id,))
        cur.execute("UPDATE commands SET state = 'failed', updated_at = now(), result = %s WHERE target_kind = 'agent' "
                    "AND target_id = %s AND state = 'sent'", (Jsonb({"error": "the agent disconnected"}), agent_id))

    async def disconnected(self, agent_id: str, peer_send=None) -> None:
        peer = self.peers.get(agent_id)
        if peer is None or (peer_send is not None and peer.send is not peer_send):
            return  # a replaced connection
        del self.peers[agent_id]
        beat = self._beats.pop(agent_id, None)

        def work(cur):
            if beat:
                cur.execute("UPDATE agents SET facts = %s WHERE id = %s", (Jsonb(beat[1]), agent_id))
            cur.execute("UPDATE agents SET status = 'offline', last_seen_at = now() WHERE id = %s AND status = 'active'",
                        (agent_id,))
            self._settle(cur, agent_id)
        await self._tx(work)
        self.writes += 1

    # -- messages ---------------------------------------------------------------------------------------------
    async def handle(self, agent_id: str, msg: dict) -> None:
        peer = self.peers.get(agent_id)
        if peer is None:
            return
        kind = msg.get("type")
        if kind == "heartbeat":
            beat = msg.get("facts")
            if isinstance(beat, dict) and len(json.dumps(beat)) <= MAX_FACTS:
                peer.last_beat = asyncio.get_running_loop().time()
                self._beats[agent_id] = (dt.datetime.now(dt.UTC), beat)
        elif kind == "output":
            await self._output(peer, msg)
        elif kind == "result":
            await self._result(peer, msg)
        else:
            log.warning("agent %s: unknown message type %.40r", agent_id, kind)

    async def _output(self, peer: Peer, msg: dict) -> None:
        cid, seq, stream, data = str(msg.get("id")), msg.get("seq"), msg.get("stream"), msg.get("data")
        if cid not in peer.inflight or not isinstance(seq, int) or stream not in STREAMS:
            log.warning("agent %s: output for a command it was not sent (%.40s); dropped", peer.id, cid)
            return
        if len(json.dumps(data)) > MAX_OUTPUT_ROW:
            return
        await self._tx(lambda cur: cur.execute(
            "INSERT INTO command_output (command_id, seq, stream, data) SELECT id, %s, %s, %s FROM commands "
            "WHERE id = %s AND target_kind = 'agent' AND target_id = %s ON CONFLICT DO NOTHING",
            (seq, stream, Jsonb(data), cid, peer.id)))

    async def _result(self, peer: Peer, msg: dict) -> None:
        cid, status, body = str(msg.get("id")), msg.get("status"), msg.get("body")
        if cid not in peer.inflight or status not in ("done", "failed", "cancelled") or not isinstance(body, dict):
            log.warning("agent %s: a result for a command it was not sent (%.40s); dropped", peer.id, cid)
            return
        kind = peer.inflight.pop(cid)
        body = {k: body[k] for k in ("exit_code", "signal", "timed_out", "truncated_bytes", "user", "error") if k in body}

        def work(cur):
            row = cur.execute("UPDATE commands SET state = CASE WHEN state = 'cancelled' THEN 'cancelled' ELSE %s END, "
                              "result = %s, updated_at = now() WHERE id = %s AND target_kind = 'agent' AND target_id = %s "
                              "AND state IN ('sent', 'cancelled') RETURNING created_by, args", (status, Jsonb(body), cid, peer.id)).fetchone()
            if row is not None and kind == "exec":  # the exec's outcome: argv, user, exit code; never the output
                audit(cur, f"agent:{peer.id}", "agents.exec.result", f"commands/{cid}", status=200,
                      detail={"by": row["created_by"], "argv": row["args"].get("argv"), "user": body.get("user"),
                              "exit_code": body.get("exit_code"), "signal": body.get("signal"),
                              "timed_out": body.get("timed_out"), "status": status})
        await self._tx(work)

    # -- the loops --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self._poll_loop(), self._flush_loop())

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - the database may be away for a moment; try again
                log.exception("agent command poll failed")
            await asyncio.sleep(self.poll_seconds)

    async def poll_once(self) -> None:
        ids = list(self.peers)
        if not ids:
            return
        inflight = [c for p in self.peers.values() for c in p.inflight]

        def work(cur):
            todo = cur.execute(
                "UPDATE commands SET state = 'sent', updated_at = now() WHERE target_kind = 'agent' AND target_id = ANY(%s) "
                "AND state = 'queued' RETURNING id, target_id, kind, args, deliver_after_reconnect", (ids,)).fetchall()
            for c in todo:
                if c["deliver_after_reconnect"]:  # resume: after the last stored entry, numbering on
                    last = cur.execute("SELECT seq, data FROM command_output WHERE command_id = %s ORDER BY seq DESC LIMIT 1",
                                       (c["id"],)).fetchone()
                    if last is not None:
                        c["args"] = {**c["args"], "seq_base": last["seq"]}
                        if last["data"].get("cursor"):
                            c["args"]["after_cursor"] = last["data"]["cursor"]
            cancelled = cur.execute("SELECT id FROM commands WHERE id = ANY(%s) AND state = 'cancelled'",
                                    (inflight,)).fetchall() if inflight else []
            revoked = cur.execute("SELECT id FROM agents WHERE id = ANY(%s) AND status = 'revoked'", (ids,)).fetchall()
            return todo, cancelled, revoked
        todo, cancelled, revoked = await self._tx(work)
        for c in todo:
            peer = self.peers.get(str(c["target_id"]))
            if peer is None:
                continue
            peer.inflight[str(c["id"])] = c["kind"]
            await peer.send({"type": "command", "id": str(c["id"]), "kind": c["kind"], "args": c["args"]})
        for c in cancelled:
            for peer in self.peers.values():
                if str(c["id"]) in peer.inflight:
                    await peer.send({"type": "cancel", "id": str(c["id"])})
        for r in revoked:
            peer = self.peers.get(str(r["id"]))
            if peer is not None:
                await peer.close(CLOSE_REVOKED, "agent revoked")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
                await self.check_silent()
                await self.sweep()
            except Exception:  # noqa: BLE001
                log.exception("agent heartbeat flush failed")

    async def flush(self) -> int:
        """Write the beats since the last flush in one statement; returns how many agents."""
        beats, self._beats = self._beats, {}
        if not beats:
            return 0
        ids = list(beats)
        seen = [beats[i][0] for i in ids]
        facts = [json.dumps(beats[i][1]) for i in ids]
        versions = [str(beats[i][1].get("version", ""))[:64] for i in ids]
        await self._tx(lambda cur: cur.execute(
            "UPDATE agents AS a SET last_seen_at = v.seen, facts = v.facts::jsonb, version = v.version, "
            "status = CASE WHEN a.status = 'offline' THEN 'active' ELSE a.status END "
            "FROM (SELECT * FROM unnest(%s::uuid[], %s::timestamptz[], %s::text[], %s::text[]) AS t(id, seen, facts, version)) AS v "
            "WHERE a.id = v.id AND a.status IN ('active', 'offline')", (ids, seen, facts, versions)))
        self.writes += 1
        return len(ids)

    async def check_silent(self) -> None:
        now = asyncio.get_running_loop().time()
        for peer in list(self.peers.values()):
            if now - peer.last_beat > self.silent_after():
                log.warning("agent %s: no heartbeat for %.0f s; closing", peer.id, now - peer.last_beat)
                await peer.close(CLOSE_SILENT, "no heartbeat")

    async def sweep(self) -> None:
        limit = offline_after(self.heartbeat_seconds, self.missed_beats)
        n = await self._tx(lambda cur: cur.execute(
            "UPDATE agents SET status = 'offline' WHERE status = 'active' AND last_seen_at < now() - make_interval(secs => %s)",
            (limit,)).rowcount)
        if n:
            self.writes += 1
