"""The agent routes of labd's API (issue 18): approve and revoke an agent, run a command on its
host, read its journal, and follow a command's output.

- ``POST /api/v1/agents/<ref>/approve``, ``/revoke``: verb ``update`` on the agent.
- ``POST /api/v1/agents/<ref>/exec {"argv": [...], "timeout": s}`` and
  ``POST /api/v1/agents/<ref>/logs {"unit", "since", "follow", "lines"}``: verb ``exec`` on the
  host's scope (``servers`` at cloud/environment/hostname: a journal can show anything a service
  logged, so reading it is as strong as running a command). The command and its audit row (argv,
  never output) are written in one transaction; 202 with the command's id. An agent that is not
  connected fails at once: 409 with when it was last seen.
- ``GET /api/v1/commands/<id>?after=N`` (routed by labd/link_api.py): state, result and the output rows after seq N (the
  caller polls; no connection is held open); ``POST /api/v1/commands/<id>/cancel``.
"""

from __future__ import annotations

from typing import Annotated

import pydantic
from flask import current_app, g, jsonify
from psycopg.types.json import Jsonb

from bastion_app.errors import ApiError
from labd import api
from labd.api import KINDS, _find, _mutate, authorize, bp, store
from labd.hub import agent as agent_hub  # noqa: I001
from labd.schemas import Loose, Strict
from labd.store import audit

MAX_ARGV = 256
MAX_ARG = 4096


NO_NUL = r"^[^\x00]*$"


class ExecRequest(Strict):
    # the published schema says what the validator checks: no NUL anywhere, a program that is not empty
    argv: Annotated[list[Annotated[str, pydantic.StringConstraints(max_length=MAX_ARG, pattern=NO_NUL)]],
                    pydantic.Field(min_length=1, max_length=MAX_ARGV, json_schema_extra={
                        "prefixItems": [{"type": "string", "minLength": 1, "maxLength": MAX_ARG, "pattern": NO_NUL}]})]
    timeout: Annotated[float, pydantic.Field(gt=0, le=24 * 3600)] | None = None

    @pydantic.field_validator("argv")
    @classmethod
    def _program(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("the program may not be empty")
        return argv


class LogsRequest(Strict):
    unit: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9@._:\\-]{1,256}$")] | None = None
    since: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9 :.+-]{1,64}$")] | None = None
    follow: bool = False
    lines: Annotated[int, pydantic.Field(ge=1, le=100000)] | None = None


class CommandCreated(Loose):
    id: str
    state: str
    agent: str
    host: str


class CommandState(Loose):
    id: str
    state: str


def _agent(ref: str) -> dict:
    return store().transaction(lambda cur: _find(cur, KINDS["agents"], ref))


def _set_status(ref: str, action: str, new: str, allowed: tuple[str, ...]):
    row = _agent(ref)
    authorize("update", "agents", KINDS["agents"].path(row), f"agents/{row['id']}")

    def work(cur):
        out = cur.execute(f"UPDATE agents SET status = %s{', revoked_at = now()' if new == 'revoked' else ''} "
                          "WHERE id = %s AND status = ANY(%s) RETURNING *", (new, row["id"], list(allowed))).fetchone()
        if out is None:
            raise ApiError(409, f"cannot {action} an agent that is {row['status']}")
        if new == "revoked":  # the hub refuses its certificates from now on (and closes a live link)
            cur.execute("UPDATE certificates SET revoked_at = now() WHERE peer_kind = 'agent' AND peer_id = %s "
                        "AND revoked_at IS NULL", (str(row["id"]),))
            cur.execute("UPDATE commands SET state = 'cancelled', updated_at = now() WHERE target_kind = 'agent' "
                        "AND target_id = %s AND state IN ('queued', 'sent')", (str(row["id"]),))
        return out
    return jsonify(KINDS["agents"].view(_mutate(f"agents.{action}", "agents", work)))


@bp.post("/agents/<ref>/approve")
def approve_agent(ref):
    return _set_status(ref, "approve", "active", ("pending",))


@bp.post("/agents/<ref>/revoke")
def revoke_agent(ref):
    return _set_status(ref, "revoke", "revoked", ("pending", "active", "offline"))


def _command(ref: str, kind: str, args: dict, audit_detail: dict, follow: bool = False):
    row = _agent(ref)
    path = KINDS["agents"].path(row)
    authorize("exec", "servers", path, f"agents/{row['id']}")
    cfg = current_app.config["LABD"]
    if not agent_hub.is_online(row, cfg.agent_heartbeat_seconds, cfg.agent_missed_beats):
        seen = api._time(row["last_seen_at"]) or "never"
        store().transaction(lambda cur: audit(cur, g.caller.user, f"agents.{kind}", f"agents/{row['id']}", outcome="refused",
                                              status=409, detail={**audit_detail, "agent_status": row["status"]}))
        state = "offline" if row["status"] == "active" else row["status"]
        raise ApiError(409, f"agent {row['hostname']} is {state}", f"last seen: {seen}")

    def work(cur):
        c = cur.execute("INSERT INTO commands (target_kind, target_id, kind, args, created_by, deliver_after_reconnect) "
                        "VALUES ('agent', %s, %s, %s, %s, %s) RETURNING id, state, created_at",
                        (str(row["id"]), kind, Jsonb(args), g.caller.user, follow)).fetchone()
        audit(cur, g.caller.user, f"agents.{kind}", f"commands/{c['id']}", status=202,
              detail={**audit_detail, "agent": str(row["id"]), "host": row["hostname"]})
        return c
    c = store().transaction(work)
    return jsonify(id=str(c["id"]), state=c["state"], agent=str(row["id"]), host=row["hostname"]), 202


@bp.post("/agents/<ref>/exec")
def exec_on_agent(ref):
    body = api._body(ExecRequest)
    args = {"argv": body.argv, **({"timeout": body.timeout} if body.timeout else {})}
    return _command(ref, "exec", args, {"argv": body.argv, "timeout": body.timeout})


@bp.post("/agents/<ref>/logs")
def logs_of_agent(ref):
    body = api._body(LogsRequest)
    args = body.model_dump(exclude_none=True)
    return _command(ref, "logs", args, args, follow=body.follow)


def _authorize_command(c: dict) -> None:
    """Your own command: always; someone else's: exec on its host."""
    if c["created_by"] == g.caller.user:
        return
    a = store().transaction(lambda cur: cur.execute("SELECT * FROM agents WHERE id::text = %s", (c["target_id"],)).fetchone())
    authorize("exec", "servers", KINDS["agents"].path(a) if a else None, f"commands/{c['id']}")


def _own_command(cid: str) -> dict:
    """An agent's command, or a bastion's logs command (labd/link_api.py): the ones a caller may cancel."""
    uid = api._uuid(cid, "command")
    c = store().transaction(lambda cur: cur.execute("SELECT * FROM commands WHERE id = %s AND (target_kind = 'agent' "
                                                    "OR kind = 'logs')", (uid,)).fetchone())
    if c is None:
        raise ApiError(404, "no such command", cid)
    if c["target_kind"] == "agent":
        _authorize_command(c)
    elif c["created_by"] != g.caller.user:
        api._global("read", "servers", f"commands/{c['id']}")
    return c


def command_with_output(c: dict, view: dict):
    """``GET /api/v1/commands/<id>`` of an agent's command (labd/link_api.py's route hands it here):
    the command and its output rows after ``?after=N``."""
    _authorize_command(c)
    from labd import link_api

    return link_api.with_output(c, view)


@bp.post("/commands/<cid>/cancel")
def cancel_command(cid):
    c = _own_command(cid)

    def work(cur):
        out = cur.execute("UPDATE commands SET state = 'cancelled', updated_at = now() WHERE id = %s "
                          "AND state IN ('queued', 'sent') RETURNING id, state", (c["id"],)).fetchone()
        return out or {"id": c["id"], "state": c["state"]}
    out = _mutate("commands.cancel", "commands", work)
    return jsonify(id=str(out["id"]), state=out["state"])
