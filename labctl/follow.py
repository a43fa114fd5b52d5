"""Following an install: the bastion's Server-Sent Events stream (`provision logs -f`) and the
event cursor (`provision install --wait`), both shown with one rich progress view.

Stream contract (docs/logs.md, GET /api/logs/<mac>/follow): ``event: log|progress|state|end``, each
with a JSON ``data:`` object and an ``id:``; comment lines are heartbeats. A dropped connection is
resumed with ``Last-Event-ID``; silence (not even a heartbeat) for ``stall_timeout`` seconds is a
stall.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from labctl import errors, output
from labctl.client import Client, iter_sse

SUCCESS = ("installed", "complete")
FAILURE = ("failed", "stalled", "error")
MAX_RECONNECTS = 5


class ProgressView:
    """A progress bar with the current stage; log lines and stage changes print above it."""

    def __init__(self, title: str):
        self.console = output.console()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task(title, total=100)
        self.stage: str | None = None

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, stage: str | None, percent: int | None = None, message: str = "") -> None:
        if stage and stage != self.stage:
            self.stage = stage
            self.console.print(f"==> {stage}" + (f": {message}" if message else ""), markup=False, highlight=False)
        kw: dict[str, Any] = {"description": stage or self.stage or "waiting"}
        if percent is not None:
            kw["completed"] = percent
        self.progress.update(self.task, **kw)

    def log(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)


def _data(raw: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"line": raw}
    return doc if isinstance(doc, dict) else {"line": str(doc)}


def _outcome(state: str | None, what: str) -> None:
    """Raise unless ``state`` means success; return quietly on success."""
    if state in SUCCESS:
        return
    raise errors.InstallFailed(f"{what}: install ended {state or 'without a result'}",
                               "labctl describe machine NAME shows the failure and its events; "
                               "labctl provision logs NAME shows the installer's log")


def show_event(view: ProgressView, kind: str, data: dict[str, Any], name: str, *, show_logs: bool = True) -> str | None:
    """One item of a machine's timeline (log|progress|state|end, docs/logs.md) on ``view``; at
    ``end``: the final state (raises InstallFailed unless it is a success). Both follows use it:
    the bastion's event stream and labd's rows of a logs command."""
    if kind == "log" and show_logs:
        view.log(str(data.get("text") or data.get("line") or ""))
    elif kind == "progress":
        view.update(data.get("stage"), data.get("percent"), data.get("message") or "")
    elif kind == "state":
        st = data.get("to") or data.get("state")
        if st:
            view.log(f"state: {data.get('from') or '-'} -> {st}" + (f" ({data['reason']})" if data.get("reason") else ""))
    elif kind == "end":
        state = data.get("state") or data.get("result") or data.get("stage")
        if state in SUCCESS:
            view.update("complete", 100)
        if data.get("stalled"):
            state = "stalled"
        elif data.get("failure"):
            view.log(f"failure: {data['failure']}")
        _outcome(state, name)
        return state
    return None


def follow_logs(client: Client, mac: str, name: str, *, stall_timeout: float = 120.0, show_logs: bool = True) -> str:
    """Follow GET /api/logs/<mac>/follow until its ``end`` event. Returns the final state on success;
    raises InstallFailed on failure or stall, NotFound if the bastion has no such stream."""
    last_id: str | None = None
    failures = 0
    with ProgressView(name) as view:
        while True:
            try:
                resp = client.stream(f"/api/logs/{mac}/follow", last_event_id=last_id, idle_timeout=stall_timeout,
                                     params={"heartbeat": max(1, min(15, int(stall_timeout / 3)))})
                for ev in iter_sse(resp):
                    failures = 0
                    if ev["id"]:
                        last_id = ev["id"]
                    state = show_event(view, ev["event"], _data(ev["data"]), name, show_logs=show_logs)
                    if state is not None:
                        return state
                # the server closed the stream without an end event: resume
                failures += 1
            except requests.exceptions.ChunkedEncodingError:
                failures += 1  # the connection broke mid-stream: resume after the last id
            except requests.exceptions.ConnectionError as exc:
                # urllib3 reports a read timeout on a stream as a ConnectionError
                if "timed out" in str(exc).lower() or isinstance(exc, requests.exceptions.Timeout):
                    raise errors.InstallFailed(f"{name}: no word from the bastion for {stall_timeout:.0f} s "
                                               "(not even a heartbeat): stalled",
                                               "check the bastion (labctl doctor) and the machine's console") from None
                failures += 1
            except errors.Unreachable:
                failures += 1
            if failures > MAX_RECONNECTS:
                raise errors.Unreachable(f"lost the log stream of {name} {MAX_RECONNECTS} times in a row",
                                         "is the bastion running? labctl doctor checks it")
            time.sleep(min(5.0, 0.5 * 2**failures))


def wait_installed(client: Client, mac: str, name: str, *, timeout: float = 7200.0, interval: float = 2.0,
                   cursor: int | None = None) -> str:
    """Poll the event cursor of one machine until it is installed (returns) or failed, stalled,
    cancelled or ``timeout`` seconds passed (InstallFailed). ``cursor``: the event id to start
    after (take it before queueing the install, so that no step is missed)."""
    cursor = client.last_event_id() if cursor is None else cursor
    deadline = time.monotonic() + timeout
    with ProgressView(name) as view:
        while True:
            events = client.events(since=cursor, mac=mac)
            for e in events:  # every step, even those that came and went between two polls
                cursor = e["id"]
                d = e.get("data") or {}
                if d.get("stage") and e["to_state"] in ("installing", "install_queued", "installed"):
                    view.update(d["stage"], d.get("percent"), d.get("message") or "")
            m = client.machine(mac)
            if m["state"] == "installed":
                view.update("complete", 100)
                return m["state"]
            if m["state"] in ("failed", "discovered"):
                _outcome(m["state"] if m["state"] == "failed" else "cancelled", name)
            if time.monotonic() >= deadline:
                raise errors.InstallFailed(f"{name}: not installed after {timeout:.0f} s (state {m['state']})",
                                           "labctl describe machine NAME shows where it stopped")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
