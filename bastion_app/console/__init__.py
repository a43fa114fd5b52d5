"""The web console: the bastion's machines and their installs in a browser (docs/console.md).

Server-rendered Jinja pages (autoescaped: nothing a machine reports becomes markup) under
``/console``, with one small static script for what a page does without reloading: the list and a
machine's page poll a fragment of themselves with ``If-None-Match`` (a 304 costs one indexed query),
and a machine's page follows its installer log over the same server-sent event stream as
``GET /api/logs/<mac>/follow``. Every change goes through the same store methods and the same
pydantic request models as the JSON API, so the console refuses exactly what the API refuses, with
the API's own messages. :mod:`bastion_app.console.security` has the login, CSRF and headers.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any
from urllib.parse import urlencode

import pydantic
from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from bastion_app import get_store
from bastion_app.console import security
from bastion_app.db import StoreError
from bastion_app.errors import ApiError, pydantic_detail
from bastion_app.routes import event_view, mac_arg, machine_view
from labcore import schemas
from labcore.domain import DEBUG_MODES, OS_NAMES, ROLE_NAMES
from labcore.lifecycle import STORED_STATES, Action, IllegalTransition, allowed_actions

bp = Blueprint("console", __name__, url_prefix="/console", static_folder="static", static_url_path="/static")

#: machines per page of the list by default and at most
PAGE, PAGE_MAX = 100, 1000
#: the columns the list sorts by (a subset of Store.SUMMARY_COLUMNS), with their headings
SORTS = {"hostname": "Host name", "mac": "MAC", "state": "State", "role": "Role", "os": "OS", "ip": "Address",
         "percent": "Progress", "updated_at": "Updated (UTC)"}
STATES = [s.value for s in STORED_STATES]
#: the actions a confirmation page asks about, with the question and the button
CONFIRM = {
    "cancel": ("Cancel the install of {name}?", "Cancel install"),
    "forget": ("Forget {name}? Its state and events are removed; it is discovered again when it next boots.", "Forget"),
    "debug": ("Boot {name} once into a debug environment?", "Request debug boot"),
}


def init_app(app) -> None:
    security.init_app(app, app.config["LAB"].data_path)
    app.register_blueprint(bp)


def _actor() -> str:
    return f"console:operator@{request.remote_addr or 'local'}"


@bp.before_request
def _guard():
    if request.endpoint in ("console.static", "console.login"):
        if request.method == "POST" and not security.csrf_ok():
            return _forbidden()
        return None
    if not security.logged_in():
        if request.endpoint in ("console.machines_live", "console.machine_live", "console.follow") or request.method != "GET":
            return Response("log in again\n", status=401, mimetype="text/plain")
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    if request.method == "POST" and not security.csrf_ok():
        return _forbidden()
    return None


def _forbidden():
    return render_template("console/error.html", title="Forbidden",
                           message="This form is out of date or did not come from the console (no valid CSRF token). "
                                   "Reload the page and try again."), 403


@bp.after_request
def _headers(resp):
    return security.harden(resp)


@bp.app_context_processor
def _context() -> dict[str, Any]:
    return {"csrf_token": security.csrf_token, "logged_in": security.logged_in, "static_endpoint": "console.static"}


@bp.app_template_filter("when")
def _when(ts: float | str | None) -> str:
    """A time (epoch seconds, or the API's ISO 8601) to the second, in UTC: 2026-01-31 12:00:00."""
    if not ts:
        return ""
    text = schemas.api_time(ts) if isinstance(ts, int | float) else str(ts)
    return text.replace("T", " ")[:19]


# -- login ---------------------------------------------------------------------------------------
def _next_url() -> str:
    target = request.values.get("next", "")
    if target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("console.machines")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        if security.token_ok(request.form.get("token", "")):
            security.log_in()
            return redirect(_next_url())
        error = "That is not this bastion's operator token."
    return render_template("console/login.html", title="Log in", error=error, next=_next_url()), 401 if error else 200


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("console.login"))


@bp.get("/")
def home():
    return redirect(url_for("console.machines"))


# -- the machines list -----------------------------------------------------------------------------
def _choice(name: str, allowed) -> str | None:
    value = request.args.get(name) or None
    return value if value in allowed else None


def _whole(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name, "")
    return min(hi, max(lo, int(raw))) if raw.isdigit() else default


def _list_query() -> dict[str, Any]:
    return {"state": _choice("state", STATES), "role": _choice("role", ROLE_NAMES), "os": _choice("os", OS_NAMES),
            "sort": _choice("sort", SORTS) or "hostname", "dir": "desc" if request.args.get("dir") == "desc" else "asc",
            "page": _whole("page", 1, 1, 10**6), "per": _whole("per", PAGE, 10, PAGE_MAX)}


def _link(q: dict[str, Any], **change) -> str:
    merged = {**q, **change}
    defaults = {"sort": "hostname", "dir": "asc", "page": 1, "per": PAGE}
    return url_for("console.machines") + "?" + urlencode(
        {k: v for k, v in merged.items() if v is not None and defaults.get(k) != v})


def _list_context() -> dict[str, Any]:
    q = _list_query()
    store = get_store()
    rows, total = store.summary_page(state=q["state"], role=q["role"], os=q["os"], sort=q["sort"],
                                     descending=q["dir"] == "desc", offset=(q["page"] - 1) * q["per"], limit=q["per"])
    pages = max(1, math.ceil(total / q["per"]))
    return {"q": q, "rows": rows, "total": total, "pages": pages, "counts": store.count_by_state(), "states": STATES,
            "roles": ROLE_NAMES, "oses": OS_NAMES, "sorts": SORTS, "link": _link}


def _etag(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _conditional(etag: str, render) -> Response:
    """A live fragment: 304 when the client has this version, else the fragment with its ETag."""
    if request.if_none_match.contains(etag):
        resp = Response(status=304)
    else:
        resp = Response(render(), mimetype="text/html")
    resp.set_etag(etag)
    resp.headers["Cache-Control"] = "no-cache, private"
    return resp


@bp.get("/machines")
def machines():
    return render_template("console/machines.html", title="Machines", **_list_context())


@bp.get("/machines/live")
def machines_live():
    etag = _etag(get_store().fingerprint(), request.query_string)
    return _conditional(etag, lambda: render_template("console/_machines.html", **_list_context()))


# -- one machine ---------------------------------------------------------------------------------
def _machine(mac: str) -> dict[str, Any]:
    try:
        mac = mac_arg(mac)
    except ApiError:
        abort(404)
    m = get_store().get(mac)
    if m is None:
        abort(404)
    return m


def _machine_context(m: dict[str, Any]) -> dict[str, Any]:
    events = get_store().events(m["mac"], since=0, limit=5000)[-200:]
    actions = {a.value for a in allowed_actions(m["state"])}
    return {"m": machine_view(m), "events": [event_view(e) for e in reversed(events)], "actions": actions,
            "name": m["hostname"] or m["mac"], "following": m["state"] in ("install_queued", "installing")}


@bp.get("/machines/<mac>")
def machine(mac: str):
    m = _machine(mac)
    ctx = _machine_context(m)
    return render_template("console/machine.html", title=ctx["name"], **ctx)


@bp.get("/machines/<mac>/live")
def machine_live(mac: str):
    m = _machine(mac)
    return _conditional(_etag(m["mac"], m["version"], m["updated_at"]),
                        lambda: render_template("console/_machine.html", **_machine_context(m)))


@bp.get("/machines/<mac>/follow")
def follow(mac: str):
    from bastion_app.routes.logs import follow_response

    return follow_response(_machine(mac)["mac"])


# -- changes -------------------------------------------------------------------------------------
def _form_errors(exc: pydantic.ValidationError) -> dict[str, str]:
    """The API's own messages (bastion_app.errors.pydantic_detail), by form field."""
    out: dict[str, str] = {}
    for e in pydantic_detail(exc):
        field, _, rest = e["field"].partition(".")
        msg = f"key {int(rest) + 1}: {e['message']}" if field == "ssh_keys" and rest.isdigit() else e["message"]
        out[field] = f"{out[field]}; {msg}" if field in out else msg
    return out


def _refusal(exc: Exception) -> str:
    """What the API would answer as ``error`` for a refused change."""
    return str(exc)


@bp.route("/machines/<mac>/install", methods=["GET", "POST"])
def install(mac: str):
    """The install form; for an installed machine it queues a reinstall (reprovision) instead, with
    what the form changes (what it leaves as it was keeps its value)."""
    m = _machine(mac)
    reinstall = m["state"] == "installed"
    values = {"hostname": m["hostname"] or "", "role": m["role"] or "", "os": m["os"] or "", "disk": m["disk"] or "",
              "ssh_keys": "\n".join(m["ssh_keys"] or []), "reason": ""}
    errors: dict[str, str] = {}
    status = 200
    if request.method == "POST":
        values = {k: request.form.get(k, "") for k in values}
        keys = [line.strip() for line in values["ssh_keys"].splitlines() if line.strip()]
        fields = {"hostname": values["hostname"].strip(), "role": values["role"], "os": values["os"],
                  "disk": values["disk"].strip(), "ssh_keys": keys}
        store = get_store()
        try:
            if reinstall:
                req = schemas.ReprovisionRequest.model_validate({**fields, "reason": values["reason"]})
                store.reprovision(m["mac"], req.model_dump(exclude={"reason"}), actor=_actor(), reason=req.reason)
                flash(f"Reinstall of {req.hostname or m['hostname']} queued: it installs at its next network boot.")
            else:
                req = schemas.InstallRequest.model_validate({"mac": m["mac"], **fields})
                store.queue_install(m["mac"], req.model_dump(exclude={"mac"}), actor=_actor())
                flash(f"Install of {req.hostname} queued: it installs at its next network boot.")
            return redirect(url_for("console.machine", mac=m["mac"]))
        except pydantic.ValidationError as exc:
            errors, status = _form_errors(exc), 422
        except (StoreError, IllegalTransition) as exc:
            errors, status = {"form": _refusal(exc)}, getattr(exc, "status", 409)
    return render_template("console/install.html", title=f"Install {m['hostname'] or m['mac']}", m=machine_view(m),
                           values=values, errors=errors, reinstall=reinstall, roles=ROLE_NAMES, oses=OS_NAMES), status


@bp.route("/machines/<mac>/<any(cancel, forget, debug):action>", methods=["GET", "POST"])
def act(mac: str, action: str):
    """A change that needs confirming: GET asks, POST does it."""
    m = _machine(mac)
    name = m["hostname"] or m["mac"]
    question, button = CONFIRM[action]
    error, status = None, 200
    if request.method == "POST":
        store, reason = get_store(), request.form.get("reason", "")
        try:
            if action == "debug":
                req = schemas.DebugRequest.model_validate({"mac": m["mac"], "mode": request.form.get("mode", "")})
                store.request_debug(m["mac"], req.mode, actor=_actor())
                flash(f"One-shot {req.mode} boot requested for {name}: it boots it at its next network boot.")
            else:
                req = schemas.ReasonRequest.model_validate({"reason": reason})
                if action == "cancel":
                    store.cancel(m["mac"], actor=_actor(), reason=req.reason)
                    flash(f"Install of {name} cancelled.")
                else:
                    store.forget(m["mac"], actor=_actor(), reason=req.reason)
                    flash(f"{name} forgotten.")
                    return redirect(url_for("console.machines"))
            return redirect(url_for("console.machine", mac=m["mac"]))
        except pydantic.ValidationError as exc:
            error, status = "; ".join(f"{k}: {v}" for k, v in _form_errors(exc).items()), 422
        except (StoreError, IllegalTransition) as exc:
            error, status = _refusal(exc), getattr(exc, "status", 409)
    allowed = action == "debug" or Action(action) in allowed_actions(m["state"])
    return render_template("console/confirm.html", title=button, m=machine_view(m), name=name, action=action,
                           question=question.format(name=name), button=button, error=error, allowed=allowed,
                           modes=DEBUG_MODES), status


@bp.errorhandler(404)
def _not_found(exc):
    return render_template("console/error.html", title="Not found", message="No such page or machine."), 404
