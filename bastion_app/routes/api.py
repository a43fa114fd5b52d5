"""The JSON API: machine-facing reports (discover, progress) and operator endpoints."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from bastion_app import get_store, metrics
from bastion_app.auth import actor, operator_required
from bastion_app.errors import ApiError
from bastion_app.routes import event_view, int_arg, json_body, mac_arg, machine_view
from labcore import schemas
from labcore.domain import OS_NAMES, ROLE_NAMES
from labcore.lifecycle import STORED_STATES

bp = Blueprint("api", __name__, url_prefix="/api")


# -- machine-facing ------------------------------------------------------------------------------
@bp.post("/discover")
def discover():
    req = json_body(schemas.DiscoverRequest)
    m = get_store().discover(req.mac, req.stored_hardware(), ip=request.remote_addr)
    answer = {"mac": m["mac"], "state": m["state"]}
    dropped = schemas.dropped_fields(req)
    if dropped:  # unknown fields beyond the bounds: the machine is accepted without them
        answer["ignored"] = dropped
        current_app.logger.warning("discovery report of %s: ignored unknown field(s) %s", m["mac"], dropped)
    return jsonify(answer), 200


@bp.post("/progress")
def progress():
    req = json_body(schemas.ProgressRequest)
    m = get_store().progress(req.mac, token=req.token, stage=req.stage, percent=req.percent,
                             message=req.message, ip=request.remote_addr)
    if m["state"] in ("installed", "failed"):
        metrics.observe_install(m, "complete" if m["state"] == "installed" else "failed")
    return jsonify({"mac": m["mac"], "state": m["state"], "stage": m["stage"], "percent": m["percent"]})


# -- operator ------------------------------------------------------------------------------------
@bp.post("/install")
@operator_required
def install():
    req = json_body(schemas.InstallRequest)
    m = get_store().queue_install(req.mac, req.model_dump(exclude={"mac"}), actor=actor())
    return jsonify(machine_view(m)), 202


@bp.post("/debug")
@operator_required
def debug():
    req = json_body(schemas.DebugRequest)
    m = get_store().request_debug(req.mac, req.mode, actor=actor())
    return jsonify(machine_view(m)), 202


def _filter(name: str, allowed) -> str | None:
    value = request.args.get(name)
    if value is not None and value not in allowed:
        raise ApiError(400, f"unknown {name} {value!r}", {"allowed": list(allowed)})
    return value


@bp.get("/machines")
@operator_required
def machines():
    rows = get_store().list(
        state=_filter("state", [s.value for s in STORED_STATES]),
        role=_filter("role", ROLE_NAMES),
        os=_filter("os", OS_NAMES),
    )
    return jsonify({"machines": [machine_view(m) for m in rows]})


@bp.get("/machines/<mac>")
@operator_required
def machine(mac: str):
    mac = mac_arg(mac)
    store = get_store()
    m = store.require(mac)
    events = store.events(mac, limit=int_arg("events", 200, 1, 5000))
    return jsonify({**machine_view(m), "events": [event_view(e) for e in events]})


@bp.delete("/machines/<mac>")
@operator_required
def forget(mac: str):
    mac = mac_arg(mac)
    get_store().forget(mac, actor=actor())
    return jsonify({"mac": mac, "state": "removed"})


@bp.post("/machines/<mac>/reprovision")
@operator_required
def reprovision(mac: str):
    mac = mac_arg(mac)
    req = json_body(schemas.ReprovisionRequest) if request.get_data() else schemas.ReprovisionRequest()
    m = get_store().reprovision(mac, req.model_dump(exclude={"reason"}), actor=actor(), reason=req.reason)
    return jsonify(machine_view(m)), 202


@bp.post("/machines/<mac>/cancel")
@operator_required
def cancel(mac: str):
    mac = mac_arg(mac)
    req = json_body(schemas.ReasonRequest) if request.get_data() else schemas.ReasonRequest()
    m = get_store().cancel(mac, actor=actor(), reason=req.reason)
    return jsonify(machine_view(m))


@bp.get("/events")
@operator_required
def events():
    mac = request.args.get("mac")
    rows = get_store().events(mac_arg(mac) if mac is not None else None, since=int_arg("since", 0, 0, 2**62),
                              limit=int_arg("limit", 500, 1, 5000))
    return jsonify({"events": [event_view(e) for e in rows]})
