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

import json
import re
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from bastion_app import get_logs, get_store
from bastion_app.auth import operator_required
from bastion_app.errors import ApiError
from bastion_app.follow import client_gone, line_view, open_stream, tail_start, timeline_items
from bastion_app.logstore import UNATTRIBUTED, LogStore, advance, clean, keepalive_interval
from bastion_app.routes import caller_claim, cfg, install_machine, int_arg, json_body, mac_arg
from bastion_app.store import NOT_ACCEPTED
from labcore import progress as timeline
from labcore import schemas, validate

bp = Blueprint("logs", __name__, url_prefix="/api")

_CURSOR = re.compile(r"(\d{1,18})-(\d{1,18})")
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARN": "warning", "WARNING": "warning", "ERROR": "err", "CRITICAL": "crit"}


def _target(mac: str) -> str:
    return UNATTRIBUTED if mac == UNATTRIBUTED else mac_arg(mac)


def _cursor(raw: str | None, name: str, *, empty_ok: bool = False) -> tuple[int, int] | None:
    """A cursor "E-L"; None when absent (an empty Last-Event-ID header counts as absent, an empty
    ``?since=`` is refused: the API's schema says E-L)."""
    if raw is None or (raw == "" and empty_ok):
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
    m = install_machine(req.mac, req.token)
    now, ip = time.time(), request.remote_addr
    n = logs.append([(req.mac, now, "api", "info", "", "", ip, line) for line in req.lines])
    best = None
    for line in req.lines:
        step = timeline.from_anaconda_line(line)
        if step is not None and (best is None or timeline.advances(best.stage, best.percent, step)):
            best = step
    advance(store, req.mac, best, machine=m, ip=ip, keepalive_s=keepalive_interval(cfg().stall_timeout),
            verdict=caller_claim(req.mac))
    return jsonify({"mac": req.mac, "stored": n})


@bp.post("/installer-events/<mac>/<token>")
def installer_events(mac: str, token: str):
    """subiquity's reporting webhook (curtin events inside): each event is kept as a log line and
    mapped onto the install timeline. The install token in the URL is the machine's credential."""
    mac = mac_arg(mac)
    try:
        token = validate.token(token)
    except validate.ValidationError:
        raise ApiError(403, NOT_ACCEPTED) from None
    raw = request.get_data(cache=True)
    try:
        doc = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body is not valid JSON", str(exc)[:200]) from None
    events = doc if isinstance(doc, list) else [doc]
    if not events or len(events) > 100 or not all(isinstance(e, dict) for e in events):
        raise ApiError(400, "body must be one reporting event (a JSON object) or a list of at most 100")
    store, logs = get_store(), get_logs()
    m = install_machine(mac, token)
    verdict = caller_claim(mac)
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
            m = store.progress(mac, token=token, stage=step.stage, percent=step.percent, message=step.message, ip=ip,
                               verdict=verdict)
            state = m["state"]
            break
        m = advance(store, mac, step, machine=m, ip=ip, verdict=verdict) or m
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


@bp.get("/logs/<mac>/follow")
@operator_required
def follow(mac: str):
    return follow_response(mac)


def follow_response(mac: str) -> Response:
    """The follow stream of ``mac`` for this request (its cursor, ``tail`` and ``heartbeat``); the
    caller has checked who asks (the API: the operator token; the console: its session)."""
    mac = _target(mac)
    store, logs = get_store(), get_logs()
    _known(mac, logs)
    heartbeat = int_arg("heartbeat", 15, 1, 300)
    start = (_cursor(request.headers.get("Last-Event-ID"), "Last-Event-ID", empty_ok=True)
             or _cursor(request.args.get("since"), "since"))
    tail = int_arg("tail", 0, 0, 100000)
    if start is None:
        start = tail_start(logs, mac, tail)
    body = open_stream(store, logs, mac, start, heartbeat=heartbeat, followers=cfg().followers,
                       gone=client_gone(request.environ.get("gunicorn.socket")))
    if body is None:
        raise ApiError(503, "too many log followers on this worker", "retry in a few seconds")
    return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
