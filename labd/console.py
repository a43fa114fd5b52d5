"""labd's web console: servers, bastions, agents, clusters and the audit log in a browser
(docs/console.md, "Under labd").

The pages ask labd's own API for what they show and change, in process, with the logged-in user's
API token: RBAC, scopes, validation and the audit log are the API's, applied exactly once. A user
logs in with name and password (``POST /api/v1/login``); the session keeps the API token it got, and
"Log out" revokes it (``POST /api/v1/logout``). Session cookie, CSRF tokens and headers are the
bastion console's (:mod:`bastion_app.console.security`), as are the style sheet and the script.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for

import bastion_app.console
from bastion_app.console import security

_BASTION_CONSOLE = Path(bastion_app.console.__file__).parent
#: labd's own templates are in labd/templates (the app's folder); the page frame, style sheet and
#: script are the bastion console's
bp = Blueprint("labd_console", __name__, url_prefix="/console", template_folder=str(_BASTION_CONSOLE.parent / "templates"),
               static_folder=str(_BASTION_CONSOLE / "static"), static_url_path="/static")

#: the list pages: resource -> (title, columns shown)
PAGES = {
    "servers": ("Servers", ("hostname", "mac", "state", "role", "os", "cloud", "environment", "bastion", "ip")),
    "bastions": ("Bastions", ("name", "cloud", "environment", "status", "last_seen_at", "version")),
    "agents": ("Agents", ("hostname", "server", "status", "cloud", "environment", "last_seen_at", "version")),
    "clusters": ("Clusters", ("name", "cloud", "environment", "members", "has_kubeconfig")),
}
#: the filters each list page offers (the API's own query parameters)
FILTERS = {"servers": ("cloud", "environment", "bastion", "state", "role", "os"), "bastions": ("cloud", "environment"),
           "agents": ("cloud", "environment"), "clusters": ("cloud", "environment")}
PER_PAGE = 50


def init_app(app) -> None:
    security.init_app(app, app.config["LABD"].data_dir)
    app.register_blueprint(bp)


def _api(method: str, path: str, *, token: str | None = None, **kw) -> tuple[int, Any]:
    """Ask labd's API (in process) as the session's user: (status, JSON or None)."""
    headers = {}
    token = token if token is not None else session.get("token")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = current_app.test_client().open(path, method=method, headers=headers,
                                       environ_base={"REMOTE_ADDR": request.remote_addr or "127.0.0.1"}, **kw)
    return r.status_code, (r.get_json(silent=True) if r.data else None)


class Refused(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(status)
        self.status, self.body = status, body or {}


def _get(url: str, **query) -> Any:
    status, body = _api("GET", url, query_string={k: v for k, v in query.items() if v not in (None, "")})
    if status != 200:
        raise Refused(status, body)
    return body


@bp.errorhandler(Refused)
def _refused(exc: Refused):
    if exc.status == 401:
        session.clear()
        if request.args.get("live"):
            return current_app.response_class("log in again\n", status=401, mimetype="text/plain")
        return redirect(url_for("labd_console.login", next=request.full_path.rstrip("?")))
    detail = exc.body.get("detail")
    message = exc.body.get("error", "refused") + (f": {detail}" if isinstance(detail, str) else "")
    return render_template("labd_console/error.html", title="Not allowed" if exc.status == 403 else "Refused",
                           message=message), exc.status


@bp.before_request
def _guard():
    if request.method == "POST" and not security.csrf_ok():
        return render_template("labd_console/error.html", title="Forbidden",
                               message="This form is out of date or did not come from the console (no valid CSRF "
                                       "token). Reload the page and try again."), 403
    if request.endpoint not in ("labd_console.login", "labd_console.static") and not session.get("token"):
        if request.args.get("live"):  # a page's poll: console.js reloads the page, which then logs in
            return current_app.response_class("log in again\n", status=401, mimetype="text/plain")
        return redirect(url_for("labd_console.login", next=request.full_path.rstrip("?")))
    return None


@bp.after_request
def _headers(resp):
    return security.harden(resp)


@bp.app_context_processor
def _context() -> dict[str, Any]:
    return {"csrf_token": security.csrf_token, "user": session.get("user"), "pages": PAGES,
            "static_endpoint": "labd_console.static"}


def _next_url() -> str:
    target = request.values.get("next", "")
    if target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("labd_console.listing", kind="servers")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        status, body = _api("POST", "/api/v1/login", token="",
                            json={"username": request.form.get("username", ""), "password": request.form.get("password", "")})
        if status == 200:
            session.clear()
            session.permanent = True
            session.update(token=body["token"], user=body["user"])
            security.csrf_token()  # a new CSRF token for the new session
            return redirect(_next_url())
        error = "Wrong user name or password." if status == 401 else (body or {}).get("error", "refused")
    return render_template("labd_console/login.html", title="Log in", error=error, next=_next_url()), 401 if error else 200


@bp.post("/logout")
def logout():
    _api("POST", "/api/v1/logout")
    session.clear()
    return redirect(url_for("labd_console.login"))


@bp.get("/")
def home():
    return redirect(url_for("labd_console.listing", kind="servers"))


def _lag(value: str | None) -> str:
    if not value:
        return "never"
    seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(value.replace("Z", "+00:00"))).total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@bp.get("/<any(servers, bastions, agents, clusters):kind>")
def listing(kind: str):
    filters = {f: request.args.get(f) or None for f in FILTERS[kind]}
    doc = _get(f"/api/v1/{kind}", **filters, limit=PER_PAGE, cursor=request.args.get("cursor"))
    rows = doc[kind]
    deletable = set()
    if kind == "servers":  # the delete button only where the API would allow it (RBAC scopes per server)
        for r in rows:
            path = f"{r['cloud']}/{r['environment']}/{r['hostname'] or r['mac']}"
            if _get("/api/v1/access-review", verb="delete", resource="servers", path=path).get("allowed"):
                deletable.add(r["id"])
    title, columns = PAGES[kind]
    more = url_for("labd_console.listing", kind=kind) + "?" + urlencode(
        {**{k: v for k, v in filters.items() if v}, "cursor": doc["next"]}) if doc.get("next") else None
    ctx = {"title": title, "kind": kind, "rows": rows, "columns": columns, "filters": filters, "deletable": deletable,
           "more": more, "lag": _lag}
    if request.args.get("live"):  # the page's poll (console.js): the table alone, 304 when unchanged
        return _fragment(render_template("labd_console/_list.html", **ctx))
    return render_template("labd_console/list.html", **ctx)


def _fragment(html: str):
    """A live fragment with an ETag of its own text: labd has no cheap change counter to ask
    first, so this saves the browser's work and the bytes, not the server's."""
    resp = current_app.make_response((html, 200, {"Cache-Control": "no-cache, private"}))
    resp.add_etag()
    return resp.make_conditional(request)


@bp.route("/servers/<ref>/delete", methods=["GET", "POST"])
def delete_server(ref: str):
    server = _get(f"/api/v1/servers/{ref}")
    if request.method == "POST":
        status, body = _api("DELETE", f"/api/v1/servers/{server['id']}")
        if status not in (200, 204):
            raise Refused(status, body)
        flash(f"Server {server['hostname'] or server['mac']} deleted.")
        return redirect(url_for("labd_console.listing", kind="servers"))
    return render_template("labd_console/confirm.html", title="Delete server", server=server)


@bp.get("/audit")
def audit():
    query = {k: request.args.get(k) or None for k in ("actor", "action", "resource")}
    doc = _get("/api/v1/audit", **query, limit=100, cursor=request.args.get("cursor"))
    more = url_for("labd_console.audit") + "?" + urlencode(
        {**{k: v for k, v in query.items() if v}, "cursor": doc["next"]}) if doc.get("next") else None
    return render_template("labd_console/audit.html", title="Audit log", rows=doc["audit"], query=query, more=more)
