"""The hub: an asyncio ``websockets`` server beside labd's API (``labd serve`` runs it as a child
process; the API and the hub share nothing but the database).

- TLS with ``ssl.CERT_REQUIRED`` against labd's CA: a peer without a certificate of this CA does
  not get past the handshake. The peer's identity is its certificate's CN (``bastion:<uuid>`` or
  ``agent:<uuid>``, labd/pki.py), never a field of a message.
- At every connect: the certificate must be recorded and not revoked and its peer must still
  exist (``labctl delete bastion`` deletes it); else the hub closes with 4001 and an audit row.
- Handshake (labcore/link.py): hello with the peer's versions -> welcome with the highest common
  one; the hub speaks the current version and the previous one (:data:`VERSIONS`); none in
  common -> close 4002.
- Messages the core handles for every kind: ``renew`` (a CSR; answered with ``certificate``,
  signed for the same identity) and ``result`` (a command's answer). Everything else goes to the
  kind's handler (:data:`HANDLERS`).
- Commands: every :data:`POLL_SECONDS` one query picks the queued commands of connected peers and
  sends them (state ``sent``); at each connect the peer's queued and sent ones are (re)sent (the
  peer applies a command id at most once, so a resend is harmless).
- Every :data:`HEARTBEAT_SECONDS` the connected peers' ``last_seen_at`` is refreshed and their
  certificates are checked again (a peer deleted meanwhile is disconnected).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import websockets
from psycopg.types.json import Jsonb

from labcore.link import CURRENT_VERSION
from labd import pki
from labd.store import Store, audit

log = logging.getLogger("labd.hub")

VERSIONS = (CURRENT_VERSION, CURRENT_VERSION - 1)  # the current protocol and the previous one
POLL_SECONDS = 0.01
HEARTBEAT_SECONDS = 5.0
HELLO_TIMEOUT = 10.0
CLOSE_REVOKED, CLOSE_VERSION, CLOSE_UNKNOWN, CLOSE_REPLACED = 4001, 4002, 4003, 4004
X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by Python's ssl)


@dataclass(eq=False)
class Peer:
    ws: object
    kind: str
    id: str
    version: int
    software: str
    fingerprint: str
    name: str = ""
    cloud: str = ""
    environment: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, msg: dict) -> None:
        async with self.lock:
            await self.ws.send(json.dumps(msg, separators=(",", ":"), default=str))


class PeerHandler:
    """What a kind of peer does on the hub (subclassed in labd/hub/bastion.py and agent.py)."""

    kind = ""
    table = ""  # its table (status, last_seen_at, version)

    def __init__(self, hub: Hub):
        self.hub = hub

    def check(self, cur, peer_id: str) -> tuple[str, dict] | str:
        """The peer's row (name, cloud, environment) or why it may not connect."""
        row = cur.execute(f"SELECT * FROM {self.table} WHERE id = %s", (peer_id,)).fetchone()
        if row is None:
            return f"{self.kind} {peer_id} was deleted in labd: enroll again with a new join token"
        return row

    def online(self, cur, peer: Peer) -> None:
        cur.execute(f"UPDATE {self.table} SET status = 'online', last_seen_at = now(), version = %s WHERE id = %s",
                    (peer.software[:64], peer.id))

    def offline(self, cur, peer: Peer) -> None:
        cur.execute(f"UPDATE {self.table} SET status = 'offline', last_seen_at = now() WHERE id = %s", (peer.id,))

    async def on_connect(self, peer: Peer) -> None:
        pass

    async def on_message(self, peer: Peer, msg: dict) -> None:
        log.warning("%s %s: unknown message type %r", peer.kind, peer.id, msg.get("type"))

    async def on_disconnect(self, peer: Peer) -> None:
        pass

    async def on_result(self, peer: Peer, msg: dict) -> None:
        """A command's answer (agents override: their results carry exit codes, not HTTP statuses)."""
        await self.hub._result(peer, msg)

    #: the streams of ``output`` messages this kind of peer may send (command_output rows)
    streams: tuple[str, ...] = ()
    MAX_OUTPUT_ROW = 64 * 1024

    async def output(self, peer: Peer, msg: dict) -> None:
        """One ``output`` message: a row of command_output, only for a command addressed to this
        peer and running (or cancelled and not yet ended); a sequence number is stored once."""
        cid, seq, stream, data = str(msg.get("id", "")), msg.get("seq"), msg.get("stream"), msg.get("data")
        if not uuid_ok(cid) or not isinstance(seq, int) or not 0 < seq < 2**31 or stream not in self.streams:
            return
        if len(json.dumps(data)) > self.MAX_OUTPUT_ROW:
            return
        await self.hub.db(lambda cur: cur.execute(
            "INSERT INTO command_output (command_id, seq, stream, data) SELECT id, %s, %s, %s FROM commands "
            "WHERE id = %s AND target_kind = %s AND target_id = %s AND state IN ('sent', 'cancelled') "
            "ON CONFLICT DO NOTHING", (seq, stream, Jsonb(data), cid, self.kind, peer.id)))

    async def send_cancels(self, sent: set[str]) -> None:
        """Send ``cancel`` to connected peers of this kind for their running commands the API
        cancelled (``sent``: those already told, kept by the caller)."""
        rows = await self.hub.db(lambda cur: cur.execute(
            "SELECT id, target_id FROM commands WHERE state = 'cancelled' AND target_kind = %s "
            "AND result IS NULL AND updated_at > now() - interval '10 minutes'", (self.kind,)).fetchall())
        for r in rows:
            cid = str(r["id"])
            peer = self.hub.peers.get(r["target_id"])
            if peer is not None and cid not in sent:
                sent.add(cid)
                await peer.send({"type": "cancel", "id": cid})

    def beat(self, cur, ids: list[str]) -> None:
        """Refresh the connected peers' last_seen_at, one statement for all (agents also write facts)."""
        cur.execute(f"UPDATE {self.table} SET last_seen_at = now(), status = 'online' WHERE id = ANY(%s)", (ids,))


def uuid_ok(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def handler_classes() -> dict[str, type[PeerHandler]]:
    from labd.hub.bastion import BastionHandler

    classes: dict[str, type[PeerHandler]] = {"bastion": BastionHandler}
    try:
        from labd.hub.agent import AgentHandler  # issue 18
    except ImportError:
        pass
    else:
        classes["agent"] = AgentHandler
    return classes


class Hub:
    def __init__(self, data_dir: Path, store: Store, *, host: str, port: int, cert: Path, key: Path,
                 bastion_cert_seconds: int = 30 * 86400, agent_cert_seconds: int = 14 * 86400, cfg=None):
        self.cfg = cfg  # labd's configuration, for the handlers' own settings (agent heartbeats)
        self.data_dir, self.store, self.host, self.port = data_dir, store, host, port
        self.cert, self.key = cert, key
        self.lifetimes = {"bastion": bastion_cert_seconds, "agent": agent_cert_seconds}
        self.handlers = {kind: cls(self) for kind, cls in handler_classes().items()}
        self.peers: dict[str, Peer] = {}
        self.sent: set[str] = set()  # command ids sent on the current connections

    async def db(self, work):
        return await asyncio.to_thread(self.store.transaction, work)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.data_dir / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        # OpenSSL checks the chain to labd's CA; the validity period the hub checks itself, so that
        # an expired certificate gets a clear reason and an audit row rather than a failed handshake
        ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        await self.db(lambda cur: [cur.execute(f"UPDATE {h.table} SET status = 'offline' WHERE status = 'online'")
                                   for h in self.handlers.values() if h.kind == "bastion"])
        async with websockets.serve(self.connection, self.host, self.port, ssl=self.ssl_context(),
                                    max_size=32 * 2 ** 20, ping_interval=15, ping_timeout=20, close_timeout=5):
            log.info("hub: listening on wss://%s:%s (protocol versions %s)", self.host, self.port, list(VERSIONS))
            if ready:
                ready.set()
            tasks = [asyncio.create_task(self._poll_commands()), asyncio.create_task(self._heartbeat())]
            await stop.wait()
            for t in tasks:
                t.cancel()

    # -- one connection -----------------------------------------------------------------------------
    async def connection(self, ws) -> None:
        sslobj = ws.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        try:
            kind, peer_id = pki.peer_of(der)
        except (ValueError, TypeError):
            await ws.close(CLOSE_UNKNOWN, "not a bastion or agent certificate of this labd")
            return
        fp = pki.der_fingerprint(der)
        handler = self.handlers.get(kind)
        if handler is None:
            await ws.close(CLOSE_UNKNOWN, f"this hub takes no {kind} peers")
            return
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT))
            versions = [int(x) for x in hello.get("versions", [])][:16]
        except (TimeoutError, ValueError, TypeError, AttributeError, websockets.ConnectionClosed):
            await ws.close(1002, "expected hello")
            return
        common = sorted(set(versions) & set(VERSIONS), reverse=True)
        software = str(hello.get("software", ""))[:64]
        if hello.get("type") != "hello" or hello.get("kind") != kind:
            await ws.close(1002, f"expected hello from a {kind}")
            return
        if not common:
            reason = (f"no common protocol version: this hub speaks {', '.join(map(str, VERSIONS))}, "
                      f"the {kind} speaks {', '.join(map(str, versions)) or 'none'}; upgrade the older side")
            await self.db(lambda cur: audit(cur, f"{kind}:{peer_id}", f"{kind}s.connect", f"{kind}s/{peer_id}",
                                            outcome="denied", status=426, detail={"reason": reason[:200]}))
            await ws.close(CLOSE_VERSION, reason[:120])
            return

        not_before, not_after = pki.validity(der)

        def check(cur):
            cert = cur.execute("SELECT revoked_at, not_after FROM certificates WHERE fingerprint = %s", (fp,)).fetchone()
            now = dt.datetime.now(dt.UTC)
            if not_after <= now:
                out = f"certificate expired at {not_after.isoformat()}: enroll again with a new join token"
            elif not_before > now + dt.timedelta(minutes=5):
                out = f"certificate not valid before {not_before.isoformat()} (check the clocks)"
            elif cert is None:
                out = "certificate unknown to labd"
            elif cert["revoked_at"] is not None:
                out = f"certificate revoked at {cert['revoked_at'].isoformat()}: enroll again with a new join token"
            else:
                out = handler.check(cur, peer_id)
            if isinstance(out, str):
                audit(cur, f"{kind}:{peer_id}", f"{kind}s.connect", f"{kind}s/{peer_id}", outcome="denied", status=403,
                      detail={"reason": out, "certificate": fp})
            return out
        row = await self.db(check)
        if isinstance(row, str):
            log.warning("hub: refused %s %s: %s", kind, peer_id, row)
            await ws.close(CLOSE_REVOKED, row[:120])
            return
        peer = Peer(ws, kind, peer_id, common[0], software, fp, name=row.get("name") or row.get("hostname") or "",
                    cloud=row.get("cloud", ""), environment=row.get("environment", ""))
        old = self.peers.get(peer_id)
        if old is not None:
            await old.ws.close(CLOSE_REPLACED, "replaced by a newer connection of the same peer")
        self.peers[peer_id] = peer
        await self.db(lambda cur: handler.online(cur, peer))
        await peer.send({"type": "welcome", "version": peer.version, "id": peer_id})
        log.info("hub: %s %s (%s) connected, protocol %s, software %s", kind, peer.name, peer_id, peer.version, software)
        try:
            await handler.on_connect(peer)
            await self._deliver(peer, resend=True)
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                t = msg.get("type")
                if t == "renew" and peer.version >= 2:
                    await self._renew(peer, msg)
                elif t == "result":
                    await handler.on_result(peer, msg)
                else:
                    await handler.on_message(peer, msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.peers.get(peer_id) is peer:
                del self.peers[peer_id]
                try:
                    await self.db(lambda cur: handler.offline(cur, peer))
                except Exception as exc:  # noqa: BLE001 - the database may be down: the heartbeat's age tells
                    log.warning("hub: could not mark %s offline: %s", peer_id, exc)
            await handler.on_disconnect(peer)
            log.info("hub: %s %s disconnected", kind, peer.name)

    async def _renew(self, peer: Peer, msg: dict) -> None:
        try:
            csr = pki.load_csr(str(msg.get("csr", "")))
        except pki.CsrError as exc:
            await peer.send({"type": "error", "detail": f"renew: {exc}"})
            return
        cert, fp, not_after = pki.sign(self.data_dir, csr, peer.kind, peer.id, self.lifetimes[peer.kind])

        def work(cur):
            pki.record(cur, fp, peer.kind, peer.id, not_after)
            audit(cur, f"{peer.kind}:{peer.id}", f"{peer.kind}s.renew", f"{peer.kind}s/{peer.id}", status=201,
                  detail={"certificate": fp})
        await self.db(work)
        await peer.send({"type": "certificate", "certificate": cert,
                         "expires_at": not_after.isoformat().replace("+00:00", "Z")})

    async def _result(self, peer: Peer, msg: dict) -> None:
        cid, status = str(msg.get("id", "")), msg.get("status")
        ok = isinstance(status, int) and 100 <= status < 600
        state = "done" if ok and status < 400 else "failed"
        result = {"status": status if ok else 502, "body": msg.get("body")}
        try:
            import uuid

            uuid.UUID(cid)
        except ValueError:
            return
        # only the peer a command was sent to can answer it, and only once
        await self.db(lambda cur: cur.execute(
            "UPDATE commands SET state = %s, result = %s, updated_at = now() WHERE id = %s AND target_kind = %s "
            "AND target_id = %s AND state IN ('queued', 'sent')", (state, Jsonb(result), cid, peer.kind, peer.id)))
        self.sent.discard(cid)

    # -- commands and heartbeats ---------------------------------------------------------------------
    async def _deliver(self, peer: Peer | None, *, resend: bool = False) -> None:
        """Send the queued commands of ``peer`` (else of every connected peer); with ``resend``
        also those sent before without an answer (at a connect)."""
        ids = [peer.id] if peer else list(self.peers)
        if not ids:
            return
        states = "state IN ('queued', 'sent')" if resend else "state = 'queued'"  # the latter: commands_queued_idx

        here = set(ids)

        def pick(cur):
            rows = None
            if peer is None:  # the poll: all queued commands (few), filtered here, without sending every peer's id
                rows = cur.execute("SELECT id, target_id, kind, args FROM commands WHERE state = 'queued' "
                                   "ORDER BY created_at LIMIT 500").fetchall()
                rows = [r for r in rows if r["target_id"] in here] if len(rows) < 500 else None
            if rows is None:  # a connect, or a long queue (commands for peers elsewhere must not starve ours)
                rows = cur.execute(f"SELECT id, target_id, kind, args FROM commands WHERE {states} AND target_id = ANY(%s) "
                                   "ORDER BY created_at LIMIT 500", (ids,)).fetchall()
            if rows:
                cur.execute("UPDATE commands SET state = 'sent', updated_at = now() WHERE id = ANY(%s) AND state = 'queued'",
                            ([r["id"] for r in rows],))
            return rows
        for r in await self.db(pick):
            p = self.peers.get(r["target_id"])
            if p is None:
                continue
            try:
                await p.send({"type": "command", "id": str(r["id"]), "kind": r["kind"], "args": r["args"]})
                self.sent.add(str(r["id"]))
            except websockets.ConnectionClosed:
                continue  # sent again when it reconnects

    async def _poll_commands(self) -> None:
        while True:
            try:
                await self._deliver(None)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: try again
                log.warning("hub: command poll failed: %s", exc)
                await asyncio.sleep(1)
            await asyncio.sleep(POLL_SECONDS)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            peers = list(self.peers.values())
            if not peers:
                continue

            try:
                bad = await self.db(lambda cur, ps=peers: self._beat(cur, ps))
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.warning("hub: heartbeat failed: %s", exc)
                continue
            for p in peers:
                if p.fingerprint in bad:
                    await p.ws.close(CLOSE_REVOKED, "revoked or deleted in labd")


    def _beat(self, cur, peers: list[Peer]) -> set[str]:
        """Refresh the connected peers' last_seen_at; the fingerprints of those revoked or deleted since."""
        bad: set[str] = set()
        for kind, h in self.handlers.items():
            ids = [p.id for p in peers if p.kind == kind]
            if not ids:
                continue
            h.beat(cur, ids)
            have = {str(r["id"]) for r in cur.execute(f"SELECT id FROM {h.table} WHERE id = ANY(%s)", (ids,)).fetchall()}
            bad |= {p.fingerprint for p in peers if p.kind == kind and p.id not in have}
        gone = cur.execute("SELECT fingerprint FROM certificates WHERE fingerprint = ANY(%s) AND revoked_at IS NOT NULL",
                           ([p.fingerprint for p in peers],)).fetchall()
        return bad | {g["fingerprint"] for g in gone}


def run(cfg, stop: asyncio.Event | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = cfg.hub_address
    store = Store(cfg.require_database(), max_size=max(4, cfg.pool_size))
    hub = Hub(cfg.data_dir, store, host=host, port=port, cert=cfg.cert_path, key=cfg.key_path,
              bastion_cert_seconds=cfg.bastion_cert_seconds, agent_cert_seconds=cfg.agent_cert_seconds, cfg=cfg)

    async def go():
        nonlocal stop
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await hub.serve(stop)
    asyncio.run(go())
    store.close()


def main() -> None:
    """``python -m labd.hub``: run by ``labd serve`` with the same configuration (LABD_* env)."""
    from labd import config as configmod

    cfg = configmod.load(Path(os.environ[configmod.DATA_DIR_ENV]))
    run(cfg)
