"""The JSON API: machine-facing reports (discover, progress) and operator endpoints."""

from __future__ import annotations

import base64
import json

from flask import Blueprint, Response, current_app, jsonify, request

from bastion_app import get_store, limits, metrics, power
from bastion_app.auth import actor, operator_required
from bastion_app.binding import Claim
from bastion_app.errors import ApiError
from bastion_app.routes import (
    caller_claim,
    cfg,
    event_view,
    install_machine,
    int_arg,
    json_body,
    mac_arg,
    machine_view,
)
from labcore import schemas, validate
from labcore.domain import OS_NAMES, ROLE_NAMES
from labcore.lifecycle import STORED_STATES

bp = Blueprint("api", __name__, url_prefix="/api")

#: GET /api/machines: machines per page by default and at most, and the hardware reports' bytes
#: after which a page ends early
MACHINES_PAGE, MACHINES_PAGE_MAX, MACHINES_PAGE_BYTES = 500, 1000, 4 * 1024 * 1024


# -- machine-facing ------------------------------------------------------------------------------
@bp.post("/discover")
def discover():
    """A hardware report. A new MAC spends the source's discovery budget (429 when spent); a
    known one is refused (403) unless the report comes from an address that speaks for it and the
    machine is not installing; the store is bounded (max_machines, max_hardware_*)."""
    req = json_body(schemas.DiscoverRequest)
    c, store, ip = cfg(), get_store(), request.remote_addr
    hardware = req.stored_hardware()
    size = len(json.dumps(hardware))
    if size > c.max_hardware_bytes:
        raise ApiError(413, f"hardware report of {size} bytes: this bastion keeps at most {c.max_hardware_bytes} "
                            "per machine (max_hardware_bytes)")
    known = store.get(req.mac) is not None
    if not known and not limits.discovery_allowed(ip):
        raise ApiError(429, "too many new machines from this host",
                       f"at most {c.discover_rate:g} new machines per second ({c.discover_burst} at once) per host")
    m = store.discover(req.mac, hardware, ip=ip, verdict=caller_claim(req.mac) if known else Claim.UNKNOWN,
                       max_machines=c.max_machines, max_hardware_total=c.max_hardware_total)
    hint = req.hardware.bmc
    if hint is not None and (hint.ipmi or hint.address):  # an unconfigured BMC, unless an operator set one
        store.set_bmc(req.mac, {"driver": "ipmi", "address": hint.address}, actor="machine", source="discovery")
    answer = {"mac": m["mac"], "state": m["state"]}
    dropped = schemas.dropped_fields(req)
    if dropped:  # unknown fields beyond the bounds: the machine is accepted without them
        answer["ignored"] = dropped
        current_app.logger.warning("discovery report of %s: ignored unknown field(s) %s", m["mac"], dropped)
    return jsonify(answer), 200


@bp.post("/progress")
def progress():
    req = json_body(schemas.ProgressRequest)
    install_machine(req.mac, req.token)  # the uniform 403 first (the store checks again, atomically)
    m = get_store().progress(req.mac, token=req.token, stage=req.stage, percent=req.percent,
                             message=req.message, ip=request.remote_addr, verdict=caller_claim(req.mac))
    if m["state"] in ("installed", "failed"):
        metrics.observe_install(m, "complete" if m["state"] == "installed" else "failed")
    return jsonify({"mac": m["mac"], "state": m["state"], "stage": m["stage"], "percent": m["percent"]})


@bp.post("/agent-join")
def agent_join():
    """The join step of lab-agent on the machine being installed (bastion_app.agent_install)."""
    from bastion_app import agent_install

    req = json_body(schemas.InstallIdentity)
    m = install_machine(req.mac, req.token)
    env = agent_install.join_env(get_store(), m, cfg())
    if env is None:
        raise ApiError(404, "no lab-agent join token for this install",
                       "the bastion is not enrolled in labd, or labd has not given one (yet)")
    return Response(env, mimetype="text/plain", headers={"Cache-Control": "no-store"})


# -- operator ------------------------------------------------------------------------------------
@bp.post("/install")
@operator_required
def install():
    req = json_body(schemas.InstallRequest)
    store = get_store()
    m = store.queue_install(req.mac, req.model_dump(exclude={"mac", "bmc"}), actor=actor())
    if req.bmc is not None:
        store.set_bmc(req.mac, power.sealed_record(cfg(), req.mac, req.bmc), actor=actor())
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


def _page_after(raw: str | None) -> tuple[str | None, str] | None:
    """The cursor of GET /api/machines: where the previous page ended, (hostname, mac), as
    base64url JSON; anything else is a 400."""
    if not raw:
        return None
    try:
        hostname, mac = json.loads(base64.urlsafe_b64decode(raw.encode("ascii") + b"=" * (-len(raw) % 4)))
        return (None if hostname is None else validate.hostname(hostname)), validate.mac(mac)
    except (ValueError, TypeError, AttributeError, validate.ValidationError):
        raise ApiError(400, "cursor must be the 'next' of an earlier answer") from None


def _page_cursor(m: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([m["hostname"], m["mac"]]).encode()).decode().rstrip("=")


@bp.get("/machines")
@operator_required
def machines():
    """One page of machines (``limit``, at most MACHINES_PAGE_MAX, and hardware reports of about
    MACHINES_PAGE_BYTES); ``next`` is the cursor of the next page, null on the last: memory per
    request is bounded, whatever the fleet's size."""
    limit = int_arg("limit", MACHINES_PAGE, 1, MACHINES_PAGE_MAX)
    rows = get_store().list(
        state=_filter("state", [s.value for s in STORED_STATES]),
        role=_filter("role", ROLE_NAMES),
        os=_filter("os", OS_NAMES),
        after=_page_after(request.args.get("cursor")),
        limit=limit + 1,
        max_bytes=MACHINES_PAGE_BYTES,
    )
    more = len(rows) > limit or sum(len(json.dumps(m["hardware"])) for m in rows) >= MACHINES_PAGE_BYTES
    rows = rows[:limit]
    return jsonify({"machines": [machine_view(m) for m in rows], "next": _page_cursor(rows[-1]) if more else None})


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


@bp.get("/machines/<mac>/bmc")
@operator_required
def bmc_get(mac: str):
    mac = mac_arg(mac)
    get_store().require(mac)
    b = get_store().get_bmc(mac)
    if b is None:
        raise ApiError(404, f"no BMC recorded for {mac}")
    return jsonify(power.view(b))


@bp.put("/machines/<mac>/bmc")
@operator_required
def bmc_put(mac: str):
    """Record a machine's BMC; the credentials are sealed at rest and never shown again."""
    mac = mac_arg(mac)
    req = json_body(schemas.BmcRequest).root
    get_store().require(mac)
    b = get_store().set_bmc(mac, power.sealed_record(cfg(), mac, req), actor=actor())
    return jsonify(power.view(b))


@bp.delete("/machines/<mac>/bmc")
@operator_required
def bmc_delete(mac: str):
    mac = mac_arg(mac)
    get_store().delete_bmc(mac, actor=actor())
    return jsonify({"mac": mac, "state": get_store().require(mac)["state"]})


@bp.get("/machines/<mac>/power")
@operator_required
def power_status(mac: str):
    """The machine's power state, asked of its BMC now."""
    return jsonify(power.run(cfg(), get_store(), mac_arg(mac), "status", actor=actor()))


@bp.post("/machines/<mac>/power")
@operator_required
def power_action(mac: str):
    """on / off / cycle through the machine's BMC, optionally setting the next boot device first."""
    mac = mac_arg(mac)
    req = json_body(schemas.PowerRequest)
    return jsonify(power.run(cfg(), get_store(), mac, req.action, boot=req.boot, persistent=req.persistent,
                             actor=actor()))


@bp.post("/power")
@operator_required
def power_batch():
    """Several machines' power, the bastion running the BMC calls with the cap and the stagger;
    one JSON line per machine as it ends, then a summary (docs/power.md, "Batch")."""
    req = json_body(schemas.PowerBatchRequest)
    lines = power.batch(cfg(), get_store(), req.macs, req.action, boot=req.boot, persistent=req.persistent,
                        max_parallel=req.max_parallel, stagger=req.stagger, actor=actor())
    body = (json.dumps(r) + "\n" for r in lines)
    # nginx passes each line on as it comes (as it does the follow stream's events)
    return Response(body, mimetype="application/x-ndjson", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
