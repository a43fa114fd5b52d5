"""Following a machine's install live: the timeline views and the server-sent event stream.

No Flask here: the route (``GET /api/logs/<mac>/follow`` in :mod:`bastion_app.routes.logs`) parses
its arguments, checks the token and wraps :func:`open_stream`'s body in a response.

- :class:`Watcher`: one thread per worker process polls both stores for new rows and wakes only
  the followers of the machines that changed;
- :func:`open_stream`: takes one of the worker's follower slots and returns the stream body, which
  merges log lines and state events in time order into SSE text with ``E-L`` cursors (the last
  event id and the last log line id delivered) and ends when the install does.

docs/logs.md describes the event types and their data.
"""

from __future__ import annotations

import heapq
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bastion_app.logstore import UNATTRIBUTED, LogStore
from labcore import progress as timeline
from labcore.lifecycle import INSTALL_TOKEN_STATES
from labcore.schemas import api_time

#: After a machine reaches installed/failed, how long the stream waits for trailing log lines.
END_LINGER_S = 0.5
#: Rows read from each store per page while catching up: a page of the longest lines (8 KB each)
#: is a few MB, and a replay of a large bucket holds one page at a time, never the bucket.
_PAGE = 200
#: How often an idle follower looks whether its client has gone (a closed client frees its slot
#: this soon, whatever heartbeat it asked for).
GONE_CHECK_S = 1.0


def client_gone(sock: socket.socket | None) -> Callable[[], bool]:
    """A check that the client at the other end of ``sock`` has closed the connection (the
    server learns it otherwise only when a write fails, a heartbeat later). An SSE client sends
    nothing after its request, so a readable socket that reads empty (or fails) is a closed one."""
    def gone() -> bool:
        if sock is None:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
    return gone


# -- views ---------------------------------------------------------------------------------------
def line_view(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "ts": api_time(r["ts"]), "mac": r["mac"], "source": r["source"], "severity": r["severity"],
            "app": r["app"], "host": r["host"], "ip": r["ip"], "text": r["text"]}


def timeline_items(e: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A store event as the follow stream shows it: a progress step, a state change, both or none."""
    kind, d = e["kind"], e["data"] or {}
    out: list[tuple[str, dict[str, Any]]] = []
    base = {"id": e["id"], "ts": api_time(e["ts"])}
    if kind in ("progress", "complete", "fail"):
        raw = d.get("stage")
        percent = 100 if kind == "complete" else d.get("percent")
        out.append(("progress", {**base, "stage": timeline.canonical_stage(raw), "raw_stage": raw, "percent": percent,
                                 "message": d.get("message") or "", "state": e["to_state"]}))
    elif kind == "start":
        out.append(("progress", {**base, "stage": "pxe", "raw_stage": "pxe", "percent": 0, "message": e["reason"],
                                 "state": e["to_state"]}))
    elif kind == "stall":
        out.append(("progress", {**base, "stage": "failed", "raw_stage": "stalled", "percent": None,
                                 "message": e["reason"], "state": e["to_state"]}))
    if e["from_state"] != e["to_state"]:
        out.append(("state", {**base, "from": e["from_state"], "to": e["to_state"], "reason": e["reason"],
                              "actor": e["actor"], "kind": kind}))
    return out


# -- waking followers ----------------------------------------------------------------------------
class Watcher:
    """One thread per worker process polls both databases for new rows and wakes only the
    followers of the machines that changed; an idle follower costs a sleeping thread, no queries."""

    def __init__(self, store, logs: LogStore, interval_s: float = 0.1):
        self.store, self.logs, self.interval_s = store, logs, interval_s
        self.subs: dict[str, set[threading.Event]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def subscribe(self, mac: str) -> threading.Event:
        ev = threading.Event()
        with self.lock:
            self.subs.setdefault(mac, set()).add(ev)
            if self.thread is None:
                # the starting point is read here, so a change made after subscribe() returns wakes
                # its followers however late the thread gets to run
                start = (self.logs.last_id(), self.store.last_event_id())
                self.thread = threading.Thread(target=self._run, args=start, name="log-follow-watcher", daemon=True)
                self.thread.start()
        return ev

    def unsubscribe(self, mac: str, ev: threading.Event) -> None:
        with self.lock:
            s = self.subs.get(mac)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self.subs[mac]

    def _run(self, lid: int, eid: int) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                lid, changed = self.logs.changed_macs(lid)
                top = self.store.last_event_id()
                if top > eid:
                    changed |= self.store.macs_with_events(eid, top)
                    eid = top
            except Exception:  # noqa: BLE001 - a locked or busy database: try again next round
                continue
            if changed:
                with self.lock:
                    wake = [ev for mac in changed for ev in self.subs.get(mac, ())]
                for ev in wake:
                    ev.set()


#: Per worker process, per state store (one per app): its watcher and its follower slots.
_watchers: dict[int, Watcher] = {}
_slots: dict[int, threading.BoundedSemaphore] = {}
_init_lock = threading.Lock()


def _process_state(store, logs: LogStore, followers: int) -> tuple[Watcher, threading.BoundedSemaphore]:
    key = id(store)  # the watcher keeps the store alive, so the id is never reused
    with _init_lock:
        if key not in _watchers:
            _watchers[key] = Watcher(store, logs)
            _slots[key] = threading.BoundedSemaphore(followers)
        return _watchers[key], _slots[key]


# -- the stream ----------------------------------------------------------------------------------
class Stream:
    """The follow body: the server closes it when the client goes away (even before the first
    chunk), and closing frees the follower slot exactly once."""

    def __init__(self, gen: Iterator[str], release):
        self.gen, self._release = gen, release
        self._done = False

    def __iter__(self):
        return self.gen

    def close(self) -> None:
        self.gen.close()
        if not self._done:
            self._done = True
            self._release()


def _sse(event: str, data: dict[str, Any] | str, cursor: str | None) -> str:
    if not event:  # a comment (an event without a timeline item, a keepalive)
        return (f"id: {cursor}\n" if cursor else "") + f": {data}\n\n"
    head = f"id: {cursor}\n" if cursor else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


#: one item of the timeline: (event, data, cursor); event "" is a comment (data is its text)
Item = tuple[str, Any, str | None]


def _pages(store, logs: LogStore, mac: str, eid: int, lid: int) -> Iterator[tuple[int, int, list[Item]]]:
    """Everything after (eid, lid), in time order, one page at a time: yields the cursor after
    each page and the page's items."""
    while True:
        lines = logs.lines(mac, since=lid, limit=_PAGE)
        events = store.events(mac, since=eid, limit=_PAGE) if mac != UNATTRIBUTED else []
        if not lines and not events:
            return
        items: list[Item] = []
        merged = heapq.merge(((r["ts"], 1, "L", r) for r in lines), ((e["ts"], 0, "E", e) for e in events),
                             key=lambda x: (x[0], x[1]))
        for _ts, _o, src, r in merged:
            if src == "L":
                lid = r["id"]
                items.append(("log", line_view(r), f"{eid}-{lid}"))
            else:
                eid = r["id"]
                shown = timeline_items(r)
                for i, (etype, data) in enumerate(shown):
                    items.append((etype, data, f"{eid}-{lid}" if i == len(shown) - 1 else None))
                if not shown:
                    items.append(("", r["kind"], f"{eid}-{lid}"))
        yield eid, lid, items
        if len(lines) < _PAGE and len(events) < _PAGE:
            return


def _timeline(store, logs: LogStore, watcher: Watcher, mac: str, start: tuple[int, int], heartbeat: int,
              gone: Callable[[], bool]) -> Iterator[list[Item]]:
    """The follow of ``mac`` from ``start`` as pages of items, live, until the install ends (an
    ``end`` item) or ``gone()``; a keepalive comment every ``heartbeat`` idle seconds."""
    ev = watcher.subscribe(mac)
    eid, lid = start
    try:
        while True:
            ev.clear()
            m = store.get(mac) if mac != UNATTRIBUTED else None
            for page_eid, page_lid, items in _pages(store, logs, mac, eid, lid):
                eid, lid = page_eid, page_lid
                yield items
            if mac != UNATTRIBUTED and (m is None or m["state"] not in INSTALL_TOKEN_STATES):
                time.sleep(END_LINGER_S)
                for page_eid, page_lid, items in _pages(store, logs, mac, eid, lid):
                    eid, lid = page_eid, page_lid
                    yield items
                end = {"state": m["state"] if m else "removed", "failure": m["failure"] if m else None,
                       "stalled": bool(m and m["failure"] == "stalled")}
                yield [("end", end, f"{eid}-{lid}")]
                return
            waited = 0.0
            while not ev.wait(min(GONE_CHECK_S, heartbeat - waited)):
                waited += GONE_CHECK_S
                if gone():
                    return
                if waited >= heartbeat:
                    yield [("", f"keepalive {int(time.time())}", None)]
                    waited = 0.0
    finally:
        watcher.unsubscribe(mac, ev)


def _events(timeline: Iterator[list[Item]], mac: str, start: tuple[int, int]) -> Iterator[str]:
    """The timeline as server-sent events (one chunk per page)."""
    try:
        yield f"retry: 2000\n: following {mac} from {start[0]}-{start[1]}\n\n"
        for items in timeline:
            yield "".join(_sse(*i) for i in items)
    finally:
        timeline.close()  # type: ignore[attr-defined]


def tail_start(logs: LogStore, mac: str, tail: int) -> tuple[int, int]:
    """The cursor a follow starts from to show the last ``tail`` log lines (and every event)."""
    newest = logs.tail(mac, tail) if tail else []
    return (0, newest[0]["id"] - 1 if newest else 0)


def open_timeline(store, logs: LogStore, mac: str, start: tuple[int, int], *, heartbeat: int, followers: int,
                  gone: Callable[[], bool] = lambda: False) -> Stream | None:
    """:func:`open_stream`'s items, not formatted (the link to labd sends them as messages): one of
    this process's ``followers`` slots until closed; None when no slot is free."""
    watcher, slots = _process_state(store, logs, followers)
    if not slots.acquire(blocking=False):
        return None
    return Stream(_timeline(store, logs, watcher, mac, start, heartbeat, gone), slots.release)


def open_stream(store, logs: LogStore, mac: str, start: tuple[int, int], *, heartbeat: int,
                followers: int, gone: Callable[[], bool] = lambda: False) -> Stream | None:
    """The SSE body following ``mac`` from the cursor ``start`` (event id, log line id), holding
    one of this worker's ``followers`` slots until it is closed or ``gone()`` says the client
    went away; None when no slot is free."""
    watcher, slots = _process_state(store, logs, followers)
    if not slots.acquire(blocking=False):
        return None
    return Stream(_events(_timeline(store, logs, watcher, mac, start, heartbeat, gone), mac, start), slots.release)
