"""labd's API for bastions and agents joining, and for commands routed to them over the link.

- ``POST /api/v1/enroll`` (public: the join token is the credential): checks the token (kind,
  expiry, uses, revocation, scope), signs the host's CSR (labd/pki.py), answers
  ``{"id","certificate","ca","expires_at","status","hub"}``. Every refusal has a clear message
  and an audit row, as has every success.
- ``POST /api/v1/servers/<mac|hostname>/<install|reprovision|cancel|forget|debug>``: the command
  goes to the bastion that holds the MAC (``bastion`` in the body when two do), through the
  ``commands`` table (inserted with its audit row in one transaction); the hub delivers it, the
  bastion applies it at most once and answers; this request waits for the answer (polling the
  database) and returns it unchanged (status and body). A bastion that is offline: 503 "bastion
  X offline since T", unless ``"queue": true`` (202, delivered when it reconnects).
- ``POST /api/v1/servers/<mac|hostname>/logs {"tail": N, "follow": bool, "bastion"}``: the
  machine's install log, which stays on its bastion: the same finding, conflict and offline rules
  (no ``queue``: a log is read now or not at all), verb ``read`` on the server; a ``logs`` command
  to the bastion, answered 202 with its id at once. The bastion sends the last N lines (with
  ``follow``, then the live timeline until the install ends) as the command's output rows.
- ``GET /api/v1/commands/<id>?after=N``: a command's state and result; for a logs command (as for
  an agent's) also its output rows after seq N, readable by whoever made it.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from flask import Blueprint, current_app, g, jsonify, request
from psycopg.types.json import Jsonb
from pydantic import Field, StringConstraints

from bastion_app.errors import ApiError
from labcore import validate as v
from labcore.schemas import Int
from labd import api, auth, pki, rbac
from labd.schemas import NAME_PATTERN, Strict
from labd.store import audit

public = Blueprint("labd_link_public", __name__)

#: a bastion whose hub connection has not refreshed last_seen_at for this long counts as offline
#: (the hub refreshes it every HEARTBEAT_SECONDS, labd/hub/core.py)
OFFLINE_AFTER_SECONDS = 15
#: how long a routed command waits for the bastion's answer before the request answers 504
COMMAND_WAIT_SECONDS = 30
#: how often the waiting request looks at the command's row
COMMAND_POLL_SECONDS = 0.005
ACTIONS = ("install", "reprovision", "cancel", "forget", "debug", "logs")
#: the most rows one GET /api/v1/commands/<id> answers (the caller asks again with ?after=)
OUTPUT_PAGE = 1000


class EnrollRequest(Strict):
    token: Annotated[str, StringConstraints(min_length=8, max_length=200)]
    kind: Literal["bastion", "agent"]
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    csr: Annotated[str, StringConstraints(max_length=16384)]
    facts: dict[str, Annotated[str, StringConstraints(max_length=256)]] = Field(default_factory=dict, max_length=32)


class RoutedCommand(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    bastion: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None
    queue: bool = False
    wait_seconds: Annotated[float, Field(ge=0, le=300)] = COMMAND_WAIT_SECONDS


class LogsCommand(Strict):
    bastion: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None
    tail: Int(1, 5000) = 200
    follow: bool = False


class CommandStarted(pydantic.BaseModel):
    command: str
    state: str
    bastion: str
    mac: str


class EnrollAnswer(pydantic.BaseModel):
    id: str
    certificate: str
    ca: str
    expires_at: str
    status: str
    hub: str


class CommandView(pydantic.BaseModel):
    id: str
    target_kind: str
    target_id: str
    kind: str
    args: dict
    state: Literal["queued", "sent", "done", "failed", "cancelled"]
    result: dict | None
    created_by: str
    created_at: str
    updated_at: str
    deliver_after_reconnect: bool


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


def hub_url(cfg) -> str:
    if cfg.hub_url:
        return cfg.hub_url
    _, port = cfg.hub_address
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    return f"wss://{host}:{port}"


def _place(scope: str, facts: dict, name: str) -> tuple[str, str] | str:
    """(cloud, environment) of a joining host: from its facts, else the token's scope when that
    names them; an error message when the token's scope does not cover the place."""
    segs = scope.split("/") if scope != "*" else ["*", "*", "*"]
    cloud = facts.get("cloud") or (segs[0] if "*" not in segs[0] and "?" not in segs[0] else "default")
    env = facts.get("environment") or (segs[1] if "*" not in segs[1] and "?" not in segs[1] else "default")
    if not rbac.scope_matches(scope, f"{cloud}/{env}/{name}"):
        return f"the token is valid for {scope}, not for {cloud}/{env}/{name}"
    return cloud, env


@public.post("/api/v1/enroll")
def enroll():
    import re

    try:
        body = EnrollRequest.model_validate(request.get_json(silent=True) or {})
    except pydantic.ValidationError as exc:
        raise ApiError(422, "invalid request", [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]}
                                                for e in exc.errors()]) from None
    for value in (body.facts.get("cloud"), body.facts.get("environment")):
        if value is not None and not re.fullmatch(NAME_PATTERN, value):
            raise ApiError(422, "invalid request", [{"field": "facts", "message": f"{value[:64]!r} is not a valid name"}])
    cfg = current_app.config["LABD"]
    actor = f"{body.kind}:{body.name}"
    lifetime = cfg.bastion_cert_seconds if body.kind == "bastion" else cfg.agent_cert_seconds

    def work(cur):
        t = cur.execute("SELECT * FROM tokens WHERE hash = %s FOR UPDATE", (auth.token_hash(body.token),)).fetchone()
        now = dt.datetime.now(dt.UTC)
        refusal = None
        if t is None or t["kind"] not in ("bastion", "agent"):
            refusal = (401, "unknown join token", "no such token: make one with `labctl create token --kind "
                       f"{body.kind}`")
        elif t["kind"] != body.kind:
            refusal = (403, "wrong kind of join token", f"this is a {t['kind']} join token; a {body.kind} needs "
                       f"`labctl create token --kind {body.kind}`")
        elif t["revoked_at"] is not None:
            refusal = (403, "join token revoked", f"the token was revoked at {_iso(t['revoked_at'])}")
        elif t["expires_at"] <= now:
            refusal = (403, "join token expired", f"the token expired at {_iso(t['expires_at'])}; make a new one")
        elif t["uses_left"] is not None and t["uses_left"] <= 0:
            refusal = (403, "join token used up", "the token has been used as many times as it allowed "
                       "(a replayed join token); make a new one")
        place = csr = None
        if refusal is None:
            place = _place(t["scope"], body.facts, body.name)
            if isinstance(place, str):
                refusal = (403, "join token out of scope", place)
        if refusal is None:  # the CSR only once the token holds (nothing is spent on a bad one)
            try:
                csr = pki.load_csr(body.csr)
            except pki.CsrError as exc:
                refusal = (400, "bad CSR", str(exc))
        if refusal:
            audit(cur, actor, f"{body.kind}s.enroll", f"{body.kind}s/{body.name}", outcome="denied",
                  status=refusal[0], detail={"reason": refusal[1], "token": str(t["id"]) if t else None})
            return refusal
        cloud, env = place
        if t["uses_left"] is not None:
            cur.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = %s", (t["id"],))
        if body.kind == "bastion":
            row = cur.execute(
                "INSERT INTO bastions (name, cloud, environment, facts) VALUES (%s, %s, %s, %s) ON CONFLICT (name) "
                "DO UPDATE SET facts = excluded.facts RETURNING id, cloud, environment",
                (body.name, cloud, env, Jsonb(body.facts))).fetchone()
            status = "active"
        else:
            status = "pending" if t["uses_left"] is None or t["scope"] == "*" else "active"
            row = cur.execute(
                "INSERT INTO agents (hostname, cloud, environment, status) VALUES (%s, %s, %s, %s) ON CONFLICT (hostname) "
                "DO UPDATE SET status = CASE WHEN agents.status = 'active' THEN 'active' ELSE excluded.status END "
                "RETURNING id, cloud, environment, status", (body.name, cloud, env, status)).fetchone()
            status = row["status"]
        peer_id = str(row["id"])
        replaced = pki.revoke_peer(cur, body.kind, peer_id)  # a re-join replaces the old identity
        cert, fp, not_after = pki.sign(cfg.data_dir, csr, body.kind, peer_id, lifetime)
        pki.record(cur, fp, body.kind, peer_id, not_after)
        audit(cur, actor, f"{body.kind}s.enroll", f"{body.kind}s/{peer_id}", status=201,
              detail={"token": str(t["id"]), "certificate": fp, "replaced": replaced, "status": status})
        return {"id": peer_id, "certificate": cert, "ca": cfg.ca_path.read_text(), "expires_at": _iso(not_after),
                "status": status, "hub": hub_url(cfg)}

    out = api.store().transaction(work)
    if isinstance(out, tuple):
        api.DENIED.labels(str(out[0])).inc()
        raise ApiError(*out)
    return jsonify(out), 201


# -- commands routed to bastions ------------------------------------------------------------------------
def bastion_online(row: dict) -> bool:
    seen = row.get("last_seen_at")
    return (row.get("status") == "online" and seen is not None
            and (dt.datetime.now(dt.UTC) - seen).total_seconds() < OFFLINE_AFTER_SECONDS)


#: the bastion view's derived fields as SQL (lists are rendered by the database: labd.api.Kind.json_sql)
BASTION_SQL = {
    "status": f"CASE WHEN status = 'online' AND (last_seen_at IS NULL OR last_seen_at < now() - interval "
              f"'{OFFLINE_AFTER_SECONDS} seconds') THEN 'offline' ELSE status END",
    "lag": "backlog",
}


def bastion_view(row: dict, out: dict) -> dict:
    """A bastion as the API shows it: its connection state (online only while the hub refreshes
    it), machine count and replication lag (events it holds that labd has not acknowledged)."""
    if out.get("status") == "online" and not bastion_online(row):
        out["status"] = "offline"
    for k in ("facts", "acked_change", "acked_event_id", "revoked_at"):
        out.pop(k, None)
    out["lag"] = out.pop("backlog", 0)
    return out


def _holders(cur, ref: str) -> tuple[str, list[dict]]:
    """(mac, [bastion rows that hold it])."""
    try:
        mac = v.mac(ref)
    except v.ValidationError:
        row = cur.execute("SELECT mac FROM servers WHERE hostname = %s", (ref.lower(),)).fetchone()
        if row is None:
            raise ApiError(404, "no such server", ref[:64]) from None
        mac = row["mac"]
    rows = cur.execute("SELECT b.* FROM server_claims c JOIN bastions b ON b.name = c.bastion WHERE c.mac = %s "
                       "ORDER BY b.name", (mac,)).fetchall()
    return mac, rows


def route(ref: str, action: str):
    if action not in ACTIONS:
        raise ApiError(404, "no such action", action[:32])
    raw = request.get_json(silent=True)
    if raw is None and request.get_data():
        raise ApiError(400, "the body must be JSON")
    try:
        body = (LogsCommand if action == "logs" else RoutedCommand).model_validate(raw or {})
    except pydantic.ValidationError as exc:
        raise ApiError(422, "invalid request", [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]}
                                                for e in exc.errors()]) from None
    if isinstance(body, LogsCommand):  # read now or not at all: never queued, the answer comes as output rows
        args, verb, queue = {"tail": body.tail, "follow": body.follow}, "read", False
    else:
        args, verb, queue = dict(body.model_extra or {}), ("delete" if action == "forget" else "update"), body.queue
    cid = uuid.uuid4()

    def work(cur):
        """Find the bastion, check the caller's grant and the bastion's state, and insert the
        command with its audit row: one transaction. Refusals come back as values (their audit
        rows are written by the caller, outside this transaction)."""
        mac, holders = _holders(cur, ref)
        if not holders:
            raise ApiError(404, "no bastion holds this machine", mac)
        if body.bastion:
            holders = [b for b in holders if b["name"] == body.bastion]
            if not holders:
                raise ApiError(404, f"bastion {body.bastion} does not hold {mac}")
        elif len(holders) > 1:
            names = [b["name"] for b in holders]
            raise ApiError(409, f"MAC {mac} is seen by bastions {', '.join(names)}: name one (--bastion)",
                           {"mac": mac, "bastions": names})
        b = holders[0]
        path = f"{b['cloud']}/{b['environment']}/{mac}"
        if not rbac.allowed(g.caller.grants, verb, "servers", path):
            return "forbidden", mac, b, path
        online = bastion_online(b)
        if not online and not queue:
            audit(cur, g.caller.user, f"servers.{action}", f"servers/{mac}", outcome="refused", status=503,
                  detail={"bastion": b["name"]})
            return "offline", mac, b, path
        cur.execute("INSERT INTO commands (id, target_kind, target_id, kind, args, created_by, deliver_after_reconnect) "
                    "VALUES (%s, 'bastion', %s, %s, %s, %s, %s)",
                    (cid, str(b["id"]), action, Jsonb({"mac": mac, **args}), g.caller.user, queue))
        audit(cur, g.caller.user, f"servers.{action}", f"servers/{mac}", status=202,
              detail={"bastion": b["name"], "command": str(cid), "queued": queue})
        return ("sent" if online else "queued"), mac, b, path
    outcome, mac, b, path = api.store().transaction(work)
    if outcome == "forbidden":
        api.authorize(verb, "servers", path, f"servers/{mac}")  # denies, with its audit row
    if outcome == "offline":
        since = _iso(b["last_seen_at"]) or "never (it has not connected yet)"
        raise ApiError(503, f"bastion {b['name']} offline since {since}",
                       "the logs stay on the bastion; ask again when it is back" if action == "logs" else
                       "the command was not sent; pass --queue to deliver it when the bastion reconnects")
    if action == "logs":  # followed with GET /api/v1/commands/<id>?after=N
        return jsonify({"command": str(cid), "state": "sent", "bastion": b["name"], "mac": mac}), 202
    if outcome == "queued":
        return jsonify({"command": str(cid), "state": "queued", "bastion": b["name"],
                        "detail": f"bastion {b['name']} is offline; delivered when it reconnects"}), 202
    time.sleep(COMMAND_POLL_SECONDS)  # it cannot have been answered yet
    return _await(cid, b["name"], body.wait_seconds, body.queue)


def _await(cid: uuid.UUID, bastion: str, wait: float, queued: bool):
    deadline = time.monotonic() + wait
    while True:
        row = api.store().transaction(lambda cur: cur.execute("SELECT state, result FROM commands WHERE id = %s",
                                                              (cid,)).fetchone())
        if row["state"] in ("done", "failed"):
            res = row["result"] or {}
            return jsonify(res.get("body")), int(res.get("status") or 502)
        if time.monotonic() >= deadline:
            break
        time.sleep(COMMAND_POLL_SECONDS)
    if not queued:  # not delivered yet: withdraw it (if the hub has sent it, the bastion answers later)
        withdrawn = api.store().transaction(lambda cur: cur.execute(
            "UPDATE commands SET state = 'cancelled', updated_at = now() WHERE id = %s AND state = 'queued' RETURNING id",
            (cid,)).fetchone())
        if withdrawn:
            raise ApiError(504, f"bastion {bastion} did not take the command in time; it was withdrawn", {"command": str(cid)})
    raise ApiError(504, f"bastion {bastion} has not answered yet", {"command": str(cid),
                   "see": f"GET /api/v1/commands/{cid}"})


def get_command(ref: str):
    cid = api._uuid(ref, "command")
    row = api.store().transaction(lambda cur: cur.execute("SELECT * FROM commands WHERE id = %s", (cid,)).fetchone())
    if row is None:
        raise ApiError(404, "no such command", ref[:64])
    if row["target_kind"] == "agent":  # with its output; readable by its creator (labd/agent_api.py)
        from labd import agent_api

        return agent_api.command_with_output(row, _command_view(row))
    if row["created_by"] != g.caller.user or row["kind"] != "logs":
        api._global("read", "servers", f"commands/{cid}")
    return with_output(row, _command_view(row)) if row["kind"] == "logs" else jsonify(_command_view(row))


def with_output(c: dict, view: dict):
    """A command (its caller authorized) with its output rows after ``?after=N``, at most
    :data:`OUTPUT_PAGE`; ``next_after`` is the ``after`` of the next request."""
    try:
        after = int(request.args.get("after", "0"))
    except ValueError:
        raise ApiError(422, "invalid request", [{"field": "after", "message": "an integer"}]) from None
    rows = api.store().transaction(lambda cur: cur.execute(
        "SELECT seq, stream, data FROM command_output WHERE command_id = %s AND seq > %s ORDER BY seq LIMIT %s",
        (c["id"], after, OUTPUT_PAGE)).fetchall())
    return jsonify({**view, "output": rows, "next_after": rows[-1]["seq"] if rows else after})


def _command_view(row: dict) -> dict[str, Any]:
    return {"id": str(row["id"]), "target_kind": row["target_kind"], "target_id": row["target_id"], "kind": row["kind"],
            "args": row["args"], "state": row["state"], "result": row["result"], "created_by": row["created_by"],
            "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
            "deliver_after_reconnect": row["deliver_after_reconnect"]}


api.bp.add_url_rule("/servers/<ref>/<action>", "route_command", route, methods=["POST"])
api.bp.add_url_rule("/commands/<ref>", "get_command", get_command, methods=["GET"])
