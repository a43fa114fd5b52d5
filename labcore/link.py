"""The client end of the link to labd's hub, shared by the bastion's link process and lab-agent.

One mutually authenticated WebSocket (TLS with the identity made by :mod:`labcore.enroll`; the hub
checks our certificate against labd's CA, we check the hub's against the same CA), dialled out
by the host (works through NAT), kept up with reconnects (exponential backoff with jitter).

Framing: JSON text messages, each an object with a ``"type"``. The handshake:

    -> {"type": "hello", "versions": [2, 1], "kind": "bastion"|"agent", "software": "<version>"}
    <- {"type": "welcome", "version": N, "id": "<our id>"}   (N: the highest version both speak)
       or the hub closes with a reason (code 4000-4099, see labd/hub/core.py)

Protocol versions: 1 = hello/welcome, replication and commands; 2 = 1 + in-band certificate
renewal (``renew``/``certificate``). The hub accepts the current version and the previous one.

Everything else is dispatched by type to the handlers given to :class:`Link` (each in a task of
its own, all cancelled when the connection drops); ``on_connect`` runs once per connection after
the welcome (e.g. the bastion's replication pump).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from labcore import enroll

log = logging.getLogger("labcore.link")

CURRENT_VERSION = 2
VERSIONS = (2, 1)  # ours, best first
#: close codes the hub uses (4000-4999 are the application's): a refusal that retrying will not fix
FATAL_CLOSE = {4001: "certificate revoked", 4002: "no common protocol version", 4003: "unknown peer"}

Handler = Callable[["Link", dict], Awaitable[None]]


def software_version() -> str:
    """This installation's lab-platform version (sent in hello, shown by `labctl get bastions`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lab-platform")
    except PackageNotFoundError:
        return "0+unknown"


class LinkError(Exception):
    pass


def ssl_context(identity_dir: Path | str) -> ssl.SSLContext:
    d = Path(identity_dir)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(d / enroll.CA_FILE))
    ctx.load_cert_chain(str(d / enroll.CERT_FILE), str(d / enroll.KEY_FILE))
    return ctx


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1, 2, ...): exponential, capped, with
    "equal jitter" (between half and all of the step) so a fleet does not reconnect in lockstep."""
    step = min(cap, base * 2 ** max(0, attempt - 1))
    return step * (rng or random).uniform(0.5, 1.0)


class Link:
    def __init__(self, identity_dir: Path | str, *, kind: str, software: str,
                 handlers: dict[str, Handler] | None = None, on_connect: Handler | None = None,
                 url: str | None = None, versions: tuple[int, ...] = VERSIONS,
                 renew_check_seconds: float = 30.0, backoff_cap: float = 30.0):
        self.dir = Path(identity_dir)
        meta = enroll.load_meta(self.dir)
        self.url = url or meta["hub"]
        self.id = meta.get("id")
        self.kind, self.software, self.versions = kind, software, tuple(versions)
        self.handlers = dict(handlers or {})
        self.on_connect = on_connect
        self.renew_check_seconds = renew_check_seconds
        self.backoff_cap = backoff_cap
        self.version: int | None = None  # negotiated, while connected
        self.connected = asyncio.Event()
        self._ws = None
        self._send_lock = asyncio.Lock()
        self._pending_key: bytes | None = None
        self.connects = 0
        self.last_error = ""

    # -- sending -------------------------------------------------------------------------------------
    async def send(self, msg: dict) -> None:
        ws = self._ws
        if ws is None:
            raise LinkError("not connected")
        async with self._send_lock:
            await ws.send(json.dumps(msg, separators=(",", ":")))

    # -- the loop -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Connect, serve, reconnect; returns when ``stop`` is set (or on a fatal refusal)."""
        stop = stop or asyncio.Event()
        attempt = 0
        while not stop.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self._session(stop)
            except asyncio.CancelledError:
                raise
            except LinkError as exc:
                self.last_error = str(exc)
                log.error("link to %s refused: %s", self.url, exc)
                if getattr(exc, "fatal", False):
                    return
            except Exception as exc:  # noqa: BLE001 - any failure of one connection: reconnect
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("link to %s: %s", self.url, self.last_error)
            if stop.is_set():
                break
            if asyncio.get_running_loop().time() - started > 30:
                attempt = 0
            attempt += 1
            delay = backoff(attempt, cap=self.backoff_cap)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    def _check_cert(self) -> None:
        _, not_after = enroll.cert_times((self.dir / enroll.CERT_FILE).read_bytes())
        if not_after <= dt.datetime.now(dt.UTC):
            err = LinkError(f"our certificate expired at {not_after.isoformat()}: enroll again "
                            f"(lab-bastion join / lab-agent join) with a new join token")
            err.fatal = True
            raise err

    async def _session(self, stop: asyncio.Event) -> None:
        import websockets

        self._check_cert()
        async with websockets.connect(self.url, ssl=ssl_context(self.dir), open_timeout=15,
                                      max_size=16 * 2 ** 20, ping_interval=15, ping_timeout=20,
                                      close_timeout=5) as ws:
            await ws.send(json.dumps({"type": "hello", "versions": list(self.versions), "kind": self.kind,
                                      "software": self.software}))
            try:
                first = json.loads(await asyncio.wait_for(ws.recv(), 15))
            except websockets.ConnectionClosed as exc:
                raise self._refusal(exc) from None
            if first.get("type") != "welcome" or first.get("version") not in self.versions:
                raise LinkError(f"unexpected answer to hello: {str(first)[:200]}")
            self.version, self.id = first["version"], first.get("id", self.id)
            self._ws = ws
            self.connects += 1
            self.connected.set()
            log.info("link up to %s (protocol %s, id %s)", self.url, self.version, self.id)
            tasks: set[asyncio.Task] = set()
            if self.on_connect:
                tasks.add(asyncio.create_task(self.on_connect(self, first)))
            if self.version >= 2:
                tasks.add(asyncio.create_task(self._renewer()))
            stopper = asyncio.create_task(stop.wait())
            try:
                while True:
                    recv = asyncio.create_task(ws.recv())
                    done, _ = await asyncio.wait({recv, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper in done:
                        recv.cancel()
                        await ws.close(1001, "going away")
                        return
                    try:
                        raw = recv.result()
                    except websockets.ConnectionClosed as exc:
                        raise self._refusal(exc) from None
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        log.warning("link: not JSON from the hub: %.200r", raw)
                        continue
                    if not isinstance(msg, dict):
                        continue
                    if msg.get("type") == "certificate":
                        self._store_certificate(msg)
                        continue
                    handler = self.handlers.get(msg.get("type"))
                    if handler is None:
                        log.warning("link: no handler for message type %r", msg.get("type"))
                        continue
                    t = asyncio.create_task(handler(self, msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    t.add_done_callback(_log_failure)
            finally:
                stopper.cancel()
                self._ws = None
                self.version = None
                self.connected.clear()
                for t in list(tasks):
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _refusal(self, exc) -> Exception:
        rcvd = getattr(exc, "rcvd", None)
        code, reason = (rcvd.code, rcvd.reason) if rcvd else (None, "")
        if code in FATAL_CLOSE:
            err = LinkError(f"the hub refused us: {reason or FATAL_CLOSE[code]}")
            err.fatal = True
            return err
        return LinkError(f"connection closed ({code}: {reason})" if code else f"connection lost: {exc}")

    # -- renewal ----------------------------------------------------------------------------------------
    async def _renewer(self) -> None:
        while True:
            cert = (self.dir / enroll.CERT_FILE).read_bytes()
            if self._pending_key is None and enroll.renew_due(cert):
                self._pending_key, csr = enroll.new_key_and_csr(enroll.cert_subject(cert))
                log.info("link: renewing our certificate (new key)")
                await self.send({"type": "renew", "csr": csr.decode()})
            await asyncio.sleep(self.renew_check_seconds)

    def _store_certificate(self, msg: dict) -> None:
        if self._pending_key is None:
            log.warning("link: a certificate we did not ask for; ignored")
            return
        ca = (self.dir / enroll.CA_FILE).read_bytes()
        enroll.store_identity(self.dir, self._pending_key, msg["certificate"], ca)
        self._pending_key = None
        log.info("link: certificate renewed, valid until %s", msg.get("expires_at"))


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("link handler failed: %r", task.exception())
