"""`lab-agent run`: the link to labd's hub (labcore.link: mTLS, reconnect with backoff, renewal
with a new key at about 2/3 of the certificate's life) and what travels on it.

Agent -> hub: ``heartbeat`` {facts} every ``heartbeat_seconds``; ``output`` {id, seq, stream, data}
(stream stdout|stderr with text, or journal with an entry); ``result`` {id, status, body}.
Hub -> agent: ``settings`` {heartbeat_seconds} (labd's interval wins over --heartbeat-seconds);
``command`` {id, kind: exec|logs, args}; ``cancel`` {id}.

Commands run in tasks of the connection: when the link drops they are cancelled (an exec is
killed with its process group; labd marks it failed). A ``logs`` follow is sent again by the hub
after a reconnect with the cursor of the last entry it stored, so the follow resumes there.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from lab_agent import VERSION, execute, facts, journal
from labcore import link

log = logging.getLogger("lab_agent")


@dataclass
class Settings:
    state_dir: Path
    exec_user: str = "nobody"
    heartbeat_seconds: float = 15.0
    journalctl: str = "journalctl"
    renew_check_seconds: float = 30.0
    backoff_cap: float = 30.0


class Agent:
    def __init__(self, settings: Settings):
        self.s = settings
        self.sampler = facts.Sampler()
        self.running: dict[str, asyncio.Task] = {}
        self._settings_changed = asyncio.Event()
        self.link = link.Link(settings.state_dir, kind="agent", software=VERSION,
                              handlers={"command": self.on_command, "cancel": self.on_cancel, "settings": self.on_settings},
                              on_connect=self.on_connect, renew_check_seconds=settings.renew_check_seconds,
                              backoff_cap=settings.backoff_cap)

    async def on_connect(self, lnk: link.Link, welcome: dict) -> None:
        while True:
            await lnk.send({"type": "heartbeat", "facts": self.sampler.sample()})
            self._settings_changed.clear()
            try:
                await asyncio.wait_for(self._settings_changed.wait(), self.s.heartbeat_seconds)
            except TimeoutError:
                pass

    async def on_settings(self, lnk: link.Link, msg: dict) -> None:
        beat = msg.get("heartbeat_seconds")
        if isinstance(beat, int | float) and 0.1 <= beat <= 3600:
            self.s.heartbeat_seconds = float(beat)
            self._settings_changed.set()

    async def on_cancel(self, lnk: link.Link, msg: dict) -> None:
        task = self.running.get(str(msg.get("id")))
        if task is not None:
            task.cancel()

    async def on_command(self, lnk: link.Link, msg: dict) -> None:
        cid, kind, args = str(msg.get("id")), msg.get("kind"), msg.get("args") or {}
        seq = int(args.get("seq_base") or 0)  # a resumed follow numbers on

        async def out(stream: str, data) -> None:
            nonlocal seq
            seq += 1
            await lnk.send({"type": "output", "id": cid, "seq": seq, "stream": stream, "data": data})

        async def work() -> tuple[str, dict]:
            if kind == "exec":
                argv = args.get("argv")
                if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                    return "failed", {"error": "argv must be a non-empty list of strings"}
                timeout = args.get("timeout")
                try:
                    r = await execute.run(argv, out, user=self.s.exec_user,
                                          timeout=float(timeout) if timeout else None)
                except (OSError, KeyError) as exc:  # no such program, no such user
                    return "failed", {"error": f"cannot run {argv[0]!r}: {exc}", "user": self.s.exec_user}
                return "done", {**r, "user": self.s.exec_user}
            if kind == "logs":
                try:
                    a = journal.argv(unit=args.get("unit"), since=args.get("since"), after_cursor=args.get("after_cursor"),
                                     follow=bool(args.get("follow")), lines=args.get("lines"), journalctl=self.s.journalctl)
                except ValueError as exc:
                    return "failed", {"error": str(exc)}
                try:
                    rc = await journal.relay(a, lambda e: out("journal", e))
                except OSError as exc:
                    return "failed", {"error": f"cannot run journalctl: {exc}"}
                return ("done" if rc == 0 else "failed"), {"exit_code": rc}
            return "failed", {"error": f"unknown command kind {kind!r}"}

        task = asyncio.create_task(work())
        self.running[cid] = task
        try:
            status, body = await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the link dropped: our own task is being cancelled
                raise
            status, body = "cancelled", {"user": self.s.exec_user} if kind == "exec" else {}
        finally:
            self.running.pop(cid, None)
        await lnk.send({"type": "result", "id": cid, "status": status, "body": body})

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.link.run(stop)
