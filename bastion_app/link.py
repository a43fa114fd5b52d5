"""The bastion's link to labd (``python -m bastion_app.link``, a child of `lab-bastion serve` once
`lab-bastion join` stored an identity in <data dir>/link/).

- Replication: machine rows (by the store's change counter, forgotten ones as tombstones) and
  events (by id) go to labd in batches; labd answers ``ack`` only after it committed a batch, and
  only then does the bastion move its acknowledged marks (in state.db). Nothing is deleted for
  the link: at every (re)connect, everything above the acknowledged marks is sent again (labd's
  writes are idempotent).
- Commands from labd (install, reprovision, cancel, forget, debug) are applied through the
  bastion's own API routes (the Flask app, in this process: the same validation and the same
  answers, 409s included), with the command id recorded in the same SQLite transaction as the
  effect (Store.applying): a command delivered twice is applied once, and the second delivery
  gets the first answer.
- Logs (``logs`` commands, ``{"mac", "tail", "follow"}``): syslog lines and progress stay here and
  go to labd only when asked: the last ``tail`` lines as the operator API answers them
  (``GET /api/logs/<mac>``), or with ``follow`` the same timeline as ``GET /api/logs/<mac>/follow``
  (bastion_app/follow.py) until the install ends; each item is an ``output`` message
  (``{"id", "seq", "stream": log|progress|state|end, "data"}``), then a ``result``. A ``cancel``
  from labd stops a follow. Logs are read, never applied: no at-most-once record.
- Agent join tokens: for each install labd knows of (its machine row acknowledged), the link asks
  labd for a join token scoped to that machine (``agent_token``, labd/hub/bastion.py) and keeps it
  with the install (Store.agent_token*); the install script carries it (docs/agent.md). Asked
  again after AGENT_TOKEN_RETRY_SECONDS while labd has not given one.
- The bastion never needs labd: this process only reads and writes state.db like any worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
import uuid
from typing import Any
from urllib.parse import quote

from bastion_app import follow
from bastion_app.routes import event_view, machine_view
from bastion_app.store import Store
from labcore import bastion_config as configmod
from labcore import enroll
from labcore import link as linkmod

log = logging.getLogger("bastion_app.link")

#: the most machine rows and events in one replicate message
BATCH = 500
#: batches sent and not yet acknowledged, at most
WINDOW = 4
#: how often an idle link looks for new changes
IDLE_POLL_SECONDS = 0.2

#: a follow that sends nothing for this long sends a keepalive to itself (to notice a cancel)
FOLLOW_HEARTBEAT_SECONDS = 5
#: how often the link looks for installs that need an agent join token, and how long it waits for
#: labd's answer before asking again
AGENT_TOKEN_POLL_SECONDS = 0.5
AGENT_TOKEN_RETRY_SECONDS = 30.0

#: a command kind -> (method, path, body) of the bastion's operator API
ROUTES = {
    "install": lambda a: ("POST", "/api/install", {k: v for k, v in a.items()}),
    "reprovision": lambda a: ("POST", f"/api/machines/{a.get('mac')}/reprovision", {k: v for k, v in a.items() if k != "mac"}),
    "cancel": lambda a: ("POST", f"/api/machines/{a.get('mac')}/cancel", {k: v for k, v in a.items() if k != "mac"}),
    "forget": lambda a: ("DELETE", f"/api/machines/{a.get('mac')}", None),
    "debug": lambda a: ("POST", "/api/debug", {k: v for k, v in a.items()}),
}


class BastionLink:
    def __init__(self, cfg: configmod.Config, *, versions: tuple[int, ...] = linkmod.VERSIONS):
        from bastion_app import create_app

        self.cfg = cfg
        self.app = create_app(cfg)
        self.store: Store = self.app.extensions["lab_store"]
        self.client = self.app.test_client()
        self.token = self.app.config["LAB_TOKEN"]
        self.command_lock = asyncio.Lock()
        self.acked = asyncio.Event()
        self.follows: dict[str, threading.Event] = {}  # logs command id -> its stop flag
        self.link = linkmod.Link(cfg.link_path, kind="bastion", software=linkmod.software_version(), versions=versions,
                                 handlers={"ack": self.on_ack, "command": self.on_command,
                                           "cancel": self.on_cancel, "agent_token": self.on_agent_token},
                                  on_connect=self.pump)

    # -- replication ---------------------------------------------------------------------------------
    def _batch(self, event_after: int, change_after: int) -> dict[str, Any]:
        rows, gone = self.store.changes_after(change_after, BATCH)
        events = self.store.events(since=event_after, limit=BATCH)
        return {"machines": [{**machine_view(m), "change": m["change_seq"]} for m in rows], "deleted": gone,
                "events": [event_view(e) for e in events]}

    async def pump(self, link: linkmod.Link, welcome: dict) -> None:
        """Per connection: replicate, and ask for the agent join tokens of installs."""
        asker = asyncio.create_task(self.ask_agent_tokens(link))
        try:
            await self.replicate(link)
        finally:
            asker.cancel()

    async def replicate(self, link: linkmod.Link) -> None:
        """Send everything above the acknowledged marks, then what comes."""
        state = await asyncio.to_thread(self.store.link_state)
        sent_event, sent_change = state["acked_event"], state["acked_change"]
        in_flight: list[tuple[int, int]] = []
        self.in_flight = in_flight
        while True:
            state = await asyncio.to_thread(self.store.link_state)
            while in_flight and in_flight[0][0] <= state["acked_event"] and in_flight[0][1] <= state["acked_change"]:
                in_flight.pop(0)
            if len(in_flight) >= WINDOW:
                self.acked.clear()
                try:
                    await asyncio.wait_for(self.acked.wait(), 30)
                except TimeoutError:  # labd did not acknowledge: resend from the marks
                    sent_event, sent_change = state["acked_event"], state["acked_change"]
                    in_flight.clear()
                continue
            batch = await asyncio.to_thread(self._batch, sent_event, sent_change)
            if not batch["events"] and not batch["machines"] and not batch["deleted"]:
                self.acked.clear()
                try:
                    await asyncio.wait_for(self.acked.wait(), IDLE_POLL_SECONDS)
                except TimeoutError:
                    pass
                continue
            sent_event = max([e["id"] for e in batch["events"]], default=sent_event)
            sent_change = max([m["change"] for m in batch["machines"]] + [d["change"] for d in batch["deleted"]],
                              default=sent_change)
            head_event = await asyncio.to_thread(self.store.last_event_id)
            await link.send({"type": "replicate", **batch, "head": {"event": head_event, "change": sent_change}})
            in_flight.append((sent_event, sent_change))

    async def on_ack(self, link: linkmod.Link, msg: dict) -> None:
        try:
            event, change = int(msg.get("event", 0)), int(msg.get("change", 0))
        except (TypeError, ValueError):
            return
        await asyncio.to_thread(self.store.link_ack, event, change)
        self.acked.set()

    # -- agent join tokens ---------------------------------------------------------------------------
    @staticmethod
    def agent_token_ref(mac: str, install_token: str) -> str:
        """The request's reference: names the install to labd without its install token."""
        return hashlib.sha256(f"{mac} {install_token}".encode()).hexdigest()[:32]

    async def ask_agent_tokens(self, link: linkmod.Link) -> None:
        while True:
            wanted = await asyncio.to_thread(self.store.agent_tokens_wanted, retry_s=AGENT_TOKEN_RETRY_SECONDS)
            for w in wanted:
                ref = self.agent_token_ref(w["mac"], w["install_token"])
                await asyncio.to_thread(self.store.agent_token_asked, w["mac"], w["install_token"], ref)
                await link.send({"type": "agent_token", "mac": w["mac"], "hostname": w["hostname"], "ref": ref})
            await asyncio.sleep(AGENT_TOKEN_POLL_SECONDS)

    async def on_agent_token(self, link: linkmod.Link, msg: dict) -> None:
        token, error = msg.get("token"), msg.get("error")
        try:
            enroll.parse_join(token if isinstance(token, str) and len(token) < 300 else "")
        except enroll.EnrollError:
            token = None
            log.warning("labd gave no agent join token for %s: %s", str(msg.get("mac"))[:32], str(error)[:200])
        await asyncio.to_thread(self.store.agent_token_answer, str(msg.get("mac", "")), str(msg.get("ref", "")),
                                token=token, error=None if token else str(error))

    # -- commands --------------------------------------------------------------------------------------
    def apply(self, command_id: str, kind: str, args: dict) -> tuple[int, Any]:
        """Apply one command at most once; (status, body) as the bastion's API answers it."""
        applied, status, body = self.store.command_result(command_id)
        if applied:
            return (status, body) if status is not None else self._lost_answer(kind, args)
        route = ROUTES.get(kind)
        if route is None or not isinstance(args, dict):
            return 400, {"error": f"unknown command {kind!r}", "detail": f"known: {', '.join(ROUTES)}"}
        method, path, body = route(args)
        with self.store.applying(command_id):
            r = self.client.open(path, method=method, json=body, headers={"Authorization": f"Bearer {self.token}"},
                                 environ_base={"REMOTE_ADDR": "labd"})
        answer = r.get_json(silent=True)
        if answer is None:
            answer = {"error": r.get_data(as_text=True)[:500]}
        return r.status_code, answer

    def keep_answer(self, command_id: str, status: int, body: Any) -> None:
        """Store the answer of an applied command (after it was sent: a command applied whose
        answer was not stored is answered again by :meth:`_lost_answer`)."""
        if self.store.command_result(command_id)[0]:
            self.store.store_command_result(command_id, status, body)

    def _lost_answer(self, kind: str, args: dict) -> tuple[int, Any]:
        """The answer of a command applied before this process died and could store its answer:
        what the route answers on success (the machine as it is now)."""
        mac = str(args.get("mac", ""))
        if kind == "forget":
            return 200, {"mac": mac, "state": "removed"}
        m = self.store.get(mac)
        if m is None:
            return 200, {"mac": mac, "detail": "applied; the machine is gone since"}
        return (200 if kind == "cancel" else 202), machine_view(m)

    async def on_command(self, link: linkmod.Link, msg: dict) -> None:
        try:
            cid = str(uuid.UUID(str(msg.get("id"))))
        except ValueError:
            return
        if msg.get("kind") == "logs":
            await self.send_logs(link, cid, msg.get("args") or {})
            return
        async with self.command_lock:  # one at a time: the check and the apply see each other
            status, body = await asyncio.to_thread(self.apply, cid, str(msg.get("kind")), msg.get("args") or {})
            try:
                await link.send({"type": "result", "id": cid, "status": status, "body": body})
            finally:
                await asyncio.to_thread(self.keep_answer, cid, status, body)

    # -- logs ----------------------------------------------------------------------------------------
    async def send_logs(self, link: linkmod.Link, cid: str, args: dict) -> None:
        """A ``logs`` command: the lines (and with ``follow`` the live timeline) as output messages."""
        if cid in self.follows:  # sent again (a reconnect of labd's side): the running one goes on
            return
        stop = self.follows[cid] = threading.Event()
        seq = 0

        async def out(stream: str, data: Any) -> None:
            nonlocal seq
            seq += 1
            await link.send({"type": "output", "id": cid, "seq": seq, "stream": stream, "data": data})
        try:
            mac, tail = str(args.get("mac", "")), args.get("tail", 200)
            # the operator API's answer first: its validation and its 404, unchanged
            r = await asyncio.to_thread(self.client.get, f"/api/logs/{quote(mac, safe='')}",
                                        query_string={"limit": tail}, headers={"Authorization": f"Bearer {self.token}"},
                                        environ_base={"REMOTE_ADDR": "labd"})
            doc = r.get_json(silent=True)
            if r.status_code != 200 or not isinstance(doc, dict):
                await link.send({"type": "result", "id": cid, "status": r.status_code,
                                 "body": doc if doc is not None else {"error": r.get_data(as_text=True)[:500]}})
                return
            if not args.get("follow"):
                for line in doc["lines"]:
                    await out("log", line)
                await link.send({"type": "result", "id": cid, "status": 200,
                                 "body": {"mac": doc["mac"], "state": doc["state"], "lines": len(doc["lines"])}})
                return
            logs = self.app.extensions["lab_logs"]
            stream = await asyncio.to_thread(
                lambda: follow.open_timeline(self.store, logs, doc["mac"], follow.tail_start(logs, doc["mac"], int(tail)),
                                             heartbeat=FOLLOW_HEARTBEAT_SECONDS, followers=self.cfg.followers,
                                             gone=stop.is_set))
            if stream is None:
                await link.send({"type": "result", "id": cid, "status": 503,
                                 "body": {"error": "too many log followers on this bastion", "detail": "retry in a few seconds"}})
                return
            try:
                ended = None
                while not stop.is_set():
                    page = await asyncio.to_thread(next, iter(stream), None)
                    if page is None:
                        break
                    for event, data, _cursor in page:
                        if event:  # comments (keepalives, events without a timeline item) stay here
                            await out(event, data)
                        if event == "end":
                            ended = data
            finally:
                stop.set()
                try:
                    await asyncio.to_thread(stream.close)
                except ValueError:  # cancelled while a page was being read: that thread ends at the flag
                    pass
            await link.send({"type": "result", "id": cid, "status": 200,
                             "body": {"mac": doc["mac"], "end": ended, "stopped": stop.is_set()}})
        finally:
            self.follows.pop(cid, None)

    async def on_cancel(self, link: linkmod.Link, msg: dict) -> None:
        flag = self.follows.get(str(msg.get("id")))
        if flag is not None:
            flag.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.link.run(stop)
        finally:  # a follow's thread ends at its flag (it would hold the process's exit)
            for flag in list(self.follows.values()):
                flag.set()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = configmod.load(os.environ.get(configmod.DATA_DIR_ENV))

    async def go():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await BastionLink(cfg).run(stop)
    asyncio.run(go())


if __name__ == "__main__":
    main()
