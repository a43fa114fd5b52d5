"""Install logs and the live timeline.

- ``POST /api/log``: raw lines from the installer (install token).
- ``POST /api/installer-events/<mac>/<token>``: subiquity's ``reporting: type: webhook`` events.
- ``GET /api/logs/<mac>``: lines + progress events, paged with a ``since=`` cursor.
- ``GET /api/logs/<mac>/follow``: the same as server-sent events, live, resumable with
  ``Last-Event-ID``, with heartbeats, ending cleanly when the install completes or fails.

A cursor is ``E-L``: the last state-store event id and the last log line id delivered. Both parts
only grow, so a follower that sends back the last id it saw gets exactly what came after.
docs/logs.md describes the event types and their data.
"""

from __future__ import annotations

import heapq
import json
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from bastion_app import get_store
from bastion_app.auth import operator_required
from bastion_app.errors import ApiError
from bastion_app.logstore import UNATTRIBUTED, LogStore, advance, clean, keepalive_interval
from bastion_app.routes import cfg, int_arg, json_body, mac_arg
from labcore import progress as timeline
from labcore import schemas, validate
from labcore.lifecycle import INSTALL_TOKEN_STATES

bp = Blueprint("logs", __name__, url_prefix="/api")

_CURSOR = re.compile(r"(\d{1,18})-(\d{1,18})")
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARN": "warning", "WARNING": "warning", "ERROR": "err", "CRITICAL": "crit"}
#: After a machine reaches installed/failed, how long the stream waits for trailing log lines.
END_LINGER_S = 0.5


def get_logs() -> LogStore:
    return current_app.extensions["lab_logs"]


def init_app(app) -> None:
    app.extensions["lab_logs"] = LogStore(app.config["LAB"].data_path / "logs.db", max_lines=app.config["LAB"].log_lines)
    app.register_blueprint(bp)


# -- views ---------------------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def line_view(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "ts": _iso(r["ts"]), "mac": r["mac"], "source": r["source"], "severity": r["severity"],
            "app": r["app"], "host": r["host"], "ip": r["ip"], "text": r["text"]}


def timeline_items(e: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A store event as the follow stream shows it: a progress step, a state change, both or none."""
    kind, d = e["kind"], e["data"] or {}
    out: list[tuple[str, dict[str, Any]]] = []
    base = {"id": e["id"], "ts": _iso(e["ts"])}
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


def _target(mac: str) -> str:
    return UNATTRIBUTED if mac == UNATTRIBUTED else mac_arg(mac)


def _cursor(raw: str | None, name: str) -> tuple[int, int] | None:
    if raw is None or raw == "":
        return None
    m = _CURSOR.fullmatch(raw.strip())
    if not m:
        raise ApiError(400, f"{name} must be a cursor E-L (two whole numbers, e.g. 12-3400) from an earlier answer")
    return int(m.group(1)), int(m.group(2))


def _known(mac: str, logs: LogStore) -> dict[str, Any] | None:
    m = get_store().get(mac) if mac != UNATTRIBUTED else None
    if m is None and mac != UNATTRIBUTED and not logs.has(mac):
        raise ApiError(404, f"no machine with MAC {mac} and no logs for it")
    return m


# -- machine-facing ------------------------------------------------------------------------------
@bp.post("/log")
def post_log():
    req = json_body(schemas.LogRequest)
    store, logs = get_store(), get_logs()
    m = store.get(req.mac)
    store.check_install_token(m, req.token)
    now, ip = time.time(), request.remote_addr
    n = logs.append([(req.mac, now, "api", "info", "", "", ip, line) for line in req.lines])
    best = None
    for line in req.lines:
        step = timeline.from_anaconda_line(line)
        if step is not None and (best is None or timeline.advances(best.stage, best.percent, step)):
            best = step
    advance(store, req.mac, best, machine=m, ip=ip, keepalive_s=keepalive_interval(cfg().stall_timeout))
    return jsonify({"mac": req.mac, "stored": n})


@bp.post("/installer-events/<mac>/<token>")
def installer_events(mac: str, token: str):
    """subiquity's reporting webhook (curtin events inside): each event is kept as a log line and
    mapped onto the install timeline. The install token in the URL is the machine's credential."""
    mac = mac_arg(mac)
    try:
        token = validate.token(token)
    except validate.ValidationError:
        raise ApiError(403, "install token does not match this machine's install") from None
    raw = request.get_data(cache=True)
    try:
        doc = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body is not valid JSON", str(exc)[:200]) from None
    events = doc if isinstance(doc, list) else [doc]
    if not events or len(events) > 100 or not all(isinstance(e, dict) for e in events):
        raise ApiError(400, "body must be one reporting event (a JSON object) or a list of at most 100")
    store, logs = get_store(), get_logs()
    m = store.get(mac)
    store.check_install_token(m, token)
    now, ip = time.time(), request.remote_addr
    rows = []
    for e in events:
        name, etype = str(e.get("name") or "")[:300], str(e.get("event_type") or "")[:20]
        text = f"{etype} {name}: {str(e.get('description') or '')[:2000]}".strip()
        if e.get("result"):
            text += f" [{str(e['result'])[:20]}]"
        sev = _LEVELS.get(str(e.get("level") or "").upper(), "err" if str(e.get("result") or "").upper() == "FAIL" else "info")
        rows.append((mac, now, "installer", sev, clean(str(e.get("origin") or "subiquity")[:48]), "", ip, clean(text)))
    logs.append(rows)
    state = m["state"]
    for e in events:
        step = timeline.from_subiquity_event(e)
        if step is None:
            continue
        if step.terminal:
            m = store.progress(mac, token=token, stage=step.stage, percent=step.percent, message=step.message, ip=ip)
            state = m["state"]
            break
        m = advance(store, mac, step, machine=m, ip=ip) or m
        state = m["state"]
    return jsonify({"mac": mac, "state": state, "stored": len(rows)})


# -- operator ------------------------------------------------------------------------------------
@bp.get("/logs/<mac>")
@operator_required
def get_machine_logs(mac: str):
    mac = _target(mac)
    logs, store = get_logs(), get_store()
    m = _known(mac, logs)
    limit = int_arg("limit", 500, 1, 5000)
    since = _cursor(request.args.get("since"), "since")
    if since is None:
        lines = logs.tail(mac, limit)
        events = store.events(mac, since=0, limit=5000) if mac != UNATTRIBUTED else []
        more = False
        eid = events[-1]["id"] if events else 0
        lid = lines[-1]["id"] if lines else 0
    else:
        eid, lid = since
        lines = logs.lines(mac, since=lid, limit=limit)
        events = store.events(mac, since=eid, limit=limit) if mac != UNATTRIBUTED else []
        more = len(lines) == limit or len(events) == limit
        eid = events[-1]["id"] if events else eid
        lid = lines[-1]["id"] if lines else lid
    items = [{"type": t, **d} for e in events for t, d in timeline_items(e)]
    return jsonify({
        "mac": mac,
        "state": m["state"] if m else None,
        "stage": m["stage"] if m else None,
        "percent": m["percent"] if m else None,
        "stalled": bool(m and m["failure"] == "stalled"),
        "lines": [line_view(r) for r in lines],
        "progress": items,
        "cursor": f"{eid}-{lid}",
        "more": more,
    })


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
                self.thread = threading.Thread(target=self._run, name="log-follow-watcher", daemon=True)
                self.thread.start()
        return ev

    def unsubscribe(self, mac: str, ev: threading.Event) -> None:
        with self.lock:
            s = self.subs.get(mac)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self.subs[mac]

    def _run(self) -> None:
        c = self.store.conn()
        lid = self.logs.last_id()
        eid = c.execute("SELECT COALESCE(max(id), 0) FROM events").fetchone()[0]
        while True:
            time.sleep(self.interval_s)
            try:
                lid, changed = self.logs.changed_macs(lid)
                top = c.execute("SELECT COALESCE(max(id), 0) FROM events").fetchone()[0]
                if top > eid:
                    changed |= {r[0] for r in c.execute("SELECT DISTINCT mac FROM events WHERE id>? AND id<=?", (eid, top))}
                    eid = top
            except Exception:  # noqa: BLE001 - a locked or busy database: try again next round
                continue
            if changed:
                with self.lock:
                    wake = [ev for mac in changed for ev in self.subs.get(mac, ())]
                for ev in wake:
                    ev.set()


_watchers: dict[int, Watcher] = {}
_slots: dict[int, threading.BoundedSemaphore] = {}
_init_lock = threading.Lock()


def _process_state(app) -> tuple[Watcher, threading.BoundedSemaphore]:
    key = id(app)
    with _init_lock:
        if key not in _watchers:
            _watchers[key] = Watcher(app.extensions["lab_store"], app.extensions["lab_logs"])
            _slots[key] = threading.BoundedSemaphore(app.config["LAB"].followers)
        return _watchers[key], _slots[key]


class _Stream:
    """The follow body: the server closes it when the client goes away (even before the first
    chunk), and closing frees the follower slot exactly once."""

    def __init__(self, gen, release):
        self.gen, self._release = gen, release
        self._done = False

    def __iter__(self):
        return self.gen

    def close(self) -> None:
        self.gen.close()
        if not self._done:
            self._done = True
            self._release()


def _sse(event: str, data: dict[str, Any], cursor: str | None) -> str:
    head = f"id: {cursor}\n" if cursor else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@bp.get("/logs/<mac>/follow")
@operator_required
def follow(mac: str):
    mac = _target(mac)
    store, logs = get_store(), get_logs()
    _known(mac, logs)
    heartbeat = int_arg("heartbeat", 15, 1, 300)
    start = _cursor(request.headers.get("Last-Event-ID"), "Last-Event-ID") or _cursor(request.args.get("since"), "since")
    tail = int_arg("tail", 0, 0, 100000)
    if start is None:
        start = (0, 0)
        if tail:
            newest = logs.tail(mac, tail)
            start = (0, newest[0]["id"] - 1 if newest else 0)
    watcher, slots = _process_state(current_app._get_current_object())
    if not slots.acquire(blocking=False):
        raise ApiError(503, "too many log followers on this worker", "retry in a few seconds")

    def drain(eid: int, lid: int):
        """Everything after (eid, lid), in time order, as SSE text; returns the new cursor."""
        chunks = []
        while True:
            lines = logs.lines(mac, since=lid, limit=1000)
            events = store.events(mac, since=eid, limit=1000) if mac != UNATTRIBUTED else []
            if not lines and not events:
                return eid, lid, chunks
            merged = heapq.merge(((r["ts"], 1, "L", r) for r in lines), ((e["ts"], 0, "E", e) for e in events),
                                 key=lambda x: (x[0], x[1]))
            for _ts, _o, src, r in merged:
                if src == "L":
                    lid = r["id"]
                    chunks.append(_sse("log", line_view(r), f"{eid}-{lid}"))
                else:
                    eid = r["id"]
                    items = timeline_items(r)
                    for i, (etype, data) in enumerate(items):
                        chunks.append(_sse(etype, data, f"{eid}-{lid}" if i == len(items) - 1 else None))
                    if not items:
                        chunks.append(f"id: {eid}-{lid}\n: {r['kind']}\n\n")
            if len(lines) < 1000 and len(events) < 1000:
                return eid, lid, chunks

    def stream():
        ev = watcher.subscribe(mac)
        eid, lid = start
        try:
            yield f"retry: 2000\n: following {mac} from {eid}-{lid}\n\n"
            while True:
                ev.clear()
                m = store.get(mac) if mac != UNATTRIBUTED else None
                eid, lid, chunks = drain(eid, lid)
                if chunks:
                    yield "".join(chunks)
                if mac != UNATTRIBUTED and (m is None or m["state"] not in INSTALL_TOKEN_STATES):
                    time.sleep(END_LINGER_S)
                    eid, lid, chunks = drain(eid, lid)
                    end = {"state": m["state"] if m else "removed", "failure": m["failure"] if m else None,
                           "stalled": bool(m and m["failure"] == "stalled")}
                    yield "".join(chunks) + _sse("end", end, f"{eid}-{lid}")
                    return
                if not ev.wait(heartbeat):
                    yield f": keepalive {int(time.time())}\n\n"
        finally:
            watcher.unsubscribe(mac, ev)

    return Response(_Stream(stream(), slots.release), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
