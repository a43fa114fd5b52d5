"""labd's HTTP API: /api/v1/... (JSON; errors {"error", "detail"}; `Authorization: Bearer <token>`).

Every mutation runs in one transaction with its audit row; every denied request (401, 403) writes
one audit row of its own. Secrets (passwords, tokens, kubeconfigs) are never in an answer except
the one that creates them, never in an audit row and never logged.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass

import pydantic
from flask import Blueprint, Response, current_app, g, jsonify, request
from psycopg.types.json import Jsonb

from bastion_app.errors import ApiError
from labcore import secretbox
from labcore import validate as v
from labd import auth, rbac
from labd import schemas as sc
from labd.metrics import DENIED
from labd.store import Store, audit

public = Blueprint("labd_public", __name__)
bp = Blueprint("labd_api", __name__, url_prefix="/api/v1")
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$"
_REF = re.compile(REF_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def store() -> Store:
    return current_app.extensions["labd_store"]


def _clean(text: str, limit: int = 256) -> str:
    return _CONTROL.sub("?", text)[:limit]


# -- public --------------------------------------------------------------------------------------------
@public.get("/healthz")
def healthz():
    return jsonify(status="ok")


@public.get("/readyz")
def readyz():
    store().ping()
    return jsonify(status="ready")


@public.get("/api/openapi.json")
def openapi():
    from labd.openapi import document

    return jsonify(document())


@public.get("/api/v1/ca")
def ca():
    return Response(current_app.config["LABD"].ca_path.read_text(), mimetype="text/plain")


@public.post("/api/v1/login")
def login():
    body = _body(sc.LoginRequest)
    cfg = current_app.config["LABD"]
    row = store().transaction(lambda cur: cur.execute("SELECT password_hash FROM users WHERE name = %s",
                                                      (body.username,)).fetchone())
    if not auth.check_password(row["password_hash"] if row else None, body.password):
        actor = _clean(body.username, 64)
        store().transaction(lambda cur: audit(cur, actor, "login", f"users/{actor}", outcome="denied", status=401))
        DENIED.labels("401").inc()
        raise ApiError(401, "wrong user name or password")
    secret = auth.new_token("api")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=cfg.token_ttl_seconds)

    def work(cur):
        cur.execute("INSERT INTO tokens (kind, hash, username, scope, expires_at, created_by) VALUES "
                    "('api', %s, %s, '*', %s, %s) RETURNING id", (auth.token_hash(secret), body.username, expires, body.username))
        tid = cur.fetchone()["id"]
        audit(cur, body.username, "login", f"users/{body.username}", status=200, detail={"token": str(tid)})

    store().transaction(work)
    return jsonify(token=secret, expires_at=_time(expires), user=body.username)


# -- authentication and authorisation -----------------------------------------------------------------
@dataclass
class Caller:
    user: str
    token_id: str
    expires_at: dt.datetime
    bindings: list[dict]
    grants: list[rbac.Grant]


def _deny(status: int, action: str, resource: str, error: str, detail=None):
    actor = g.caller.user if g.get("caller") else "anonymous"
    store().transaction(lambda cur: audit(cur, actor, action, _clean(resource), outcome="denied", status=status,
                                          detail={"method": request.method}))
    DENIED.labels(str(status)).inc()
    raise ApiError(status, error, detail)


@bp.before_request
def authenticate():
    header = request.headers.get("Authorization", "")
    secret = header[7:].strip() if header[:7].lower() == "bearer " else ""
    caller = None
    if secret:
        rows = store().transaction(lambda cur: cur.execute(
            "SELECT t.id, t.username, t.expires_at, b.role, b.scope, r.rules FROM tokens t "
            "JOIN users u ON u.name = t.username "
            "LEFT JOIN role_bindings b ON b.username = t.username LEFT JOIN roles r ON r.name = b.role "
            "WHERE t.hash = %s AND t.kind = 'api' AND t.revoked_at IS NULL AND t.expires_at > now() "
            "ORDER BY b.role, b.scope", (auth.token_hash(secret),)).fetchall())
        if rows:
            bound = [r for r in rows if r["role"] is not None and r["rules"] is not None]
            caller = Caller(rows[0]["username"], str(rows[0]["id"]), rows[0]["expires_at"],
                            [{"role": r["role"], "scope": r["scope"]} for r in bound],
                            rbac.grants([(r["rules"], r["scope"]) for r in bound]))
    if caller is None:
        _deny(401, "authenticate", request.path, "authentication required",
              "send Authorization: Bearer <token> (POST /api/v1/login makes one)" if not secret
              else "the token is unknown, expired or revoked")
    g.caller = caller


def authorize(verb: str, resource: str, path: str | None, name: str) -> None:
    if not rbac.allowed(g.caller.grants, verb, resource, path):
        _deny(403, f"{resource}.{verb}", name, "forbidden",
              f"{g.caller.user} may not {verb} {resource}" + (f" in {path}" if path else ""))


def _mutate(action: str, resource: str, work, status: int = 200):
    """Run ``work(cur)`` (returns the row to answer, or None) and its audit row in one transaction."""
    def tx(cur):
        out = work(cur)
        rid = str(out["id"]) if isinstance(out, dict) and "id" in out else (out.get("name") if isinstance(out, dict) else "")
        audit(cur, g.caller.user, action, f"{resource}/{rid}" if rid else resource, status=status)
        return out
    return store().transaction(tx)


# -- helpers: bodies, times, cursors ----------------------------------------------------------------------
def _body(model: type[pydantic.BaseModel]):
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "a JSON body is required")
    return model.model_validate(data)


def _query(model: type[pydantic.BaseModel]):
    raw = {k: (request.args.getlist(k) if k == "label" else request.args.get(k)) for k in request.args}
    return model.model_validate(raw)


def _time(value: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC, as the database renders a timestamptz in JSON (session time zone UTC)."""
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _plain(row: dict) -> dict:
    return {k: (_time(x) if isinstance(x, dt.datetime) else str(x) if isinstance(x, uuid.UUID) else x) for k, x in row.items()}


def _page(rows: list[dict], limit: int, key) -> tuple[list[dict], str | None]:
    """One page (fetched with limit + 1 rows) and the cursor of the next, None on the last."""
    if len(rows) > limit:
        return rows[:limit], key(rows[limit - 1])
    return rows, None


# -- the fleet: servers, bastions, agents, clusters ---------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    name: str
    create: type
    patch: type
    query: type
    key: str  # unique name column, the third scope segment (servers: hostname, else the MAC)
    refs: tuple[str, ...]  # columns a <ref> in a URL may name (besides the id)
    json_cols: tuple[str, ...]
    not_null: tuple[str, ...]
    filters: tuple[str, ...]
    updated_at: bool = False

    def leaf_sql(self) -> str:
        return "COALESCE(hostname, mac)" if self.name == "servers" else self.key

    def path(self, row: dict) -> str:
        leaf = (row.get("hostname") or row["mac"]) if self.name == "servers" else row[self.key]
        return f"{row['cloud']}/{row['environment']}/{leaf}"

    def json_sql(self) -> str:
        """A row as its answer's JSON text (the view's fields, in the view's order)."""
        fields = [f for f in VIEWS[self.name].model_fields]
        exprs = ["kubeconfig IS NOT NULL" if f == "has_kubeconfig" else f for f in fields]
        if self.name == "bastions":
            from labd.link_api import BASTION_SQL

            exprs = [BASTION_SQL.get(f, e) for f, e in zip(fields, exprs, strict=True)]
        return "json_build_object(" + ", ".join(f"'{f}', {e}" for f, e in zip(fields, exprs, strict=True)) + ")::text"

    def view(self, row: dict) -> dict:
        out = _plain(row)
        if self.name == "clusters":
            out["has_kubeconfig"] = out.pop("kubeconfig") is not None
        if self.name == "bastions":
            from labd.link_api import bastion_view

            out = bastion_view(row, out)
        return out


VIEWS = {"servers": sc.ServerView, "bastions": sc.BastionView, "agents": sc.AgentView, "clusters": sc.ClusterView}
KINDS = {k.name: k for k in [
    Kind("servers", sc.ServerCreate, sc.ServerPatch, sc.ServerQuery, "mac", ("mac", "hostname"),
         ("ssh_keys", "hardware", "labels"), ("cloud", "environment", "disk", "ssh_keys", "state", "labels"),
         ("cloud", "environment", "bastion", "state", "role", "os"), updated_at=True),
    Kind("bastions", sc.BastionCreate, sc.BastionPatch, sc.ScopedQuery, "name", ("name",), (),
         ("cloud", "environment"), ("cloud", "environment")),
    Kind("agents", sc.AgentCreate, sc.AgentPatch, sc.ScopedQuery, "hostname", ("hostname",), (),
         ("status",), ("cloud", "environment")),
    Kind("clusters", sc.ClusterCreate, sc.ClusterPatch, sc.ScopedQuery, "name", ("name",), ("members",),
         ("members",), ("cloud", "environment"), updated_at=True),
]}


def _columns(kind: Kind, values: dict) -> dict:
    return {k: (Jsonb(x) if k in kind.json_cols and x is not None else x) for k, x in values.items()}


def _find(cur, kind: Kind, ref: str) -> dict:
    if not _REF.fullmatch(ref):
        raise ApiError(404, f"no such {kind.name[:-1]}", ref[:64])
    conds, params = [], []
    try:
        params.append(uuid.UUID(ref))
        conds.append("id = %s")
    except ValueError:
        pass
    for col in kind.refs:
        value = ref
        if col == "mac":
            try:
                value = v.mac(ref)
            except v.ValidationError:
                continue
        conds.append(f"{col} = %s")
        params.append(value.lower() if col in ("hostname",) else value)
    row = cur.execute(f"SELECT * FROM {kind.name} WHERE {' OR '.join(conds)} LIMIT 1", params).fetchone() if conds else None
    if row is None:
        raise ApiError(404, f"no such {kind.name[:-1]}", ref)
    return row


def list_query(kind: Kind, grants: list[rbac.Grant], q) -> tuple[str, list] | None:
    """The SQL (and its parameters) of one page of a list, for the caller's grants and the query's
    filters; None when no grant reaches the resource. Each row comes as its answer's JSON text,
    rendered by the database (json_build_object), so labd does not decode and encode it again."""
    scope = rbac.sql_filter(grants, "read", kind.name, ("cloud", "environment", kind.leaf_sql()))
    if scope is None:
        return None
    where, params = [scope[0]], list(scope[1])
    for col in kind.filters:
        value = getattr(q, col)
        if value is not None:
            where.append(f"{col} = %s")
            params.append(value)
    if getattr(q, "label", None):
        labels = dict(sel.split("=", 1) for sel in q.label)
        where.append("labels @> %s")
        params.append(Jsonb(labels))
    if q.cursor is not None:
        where.append(f"{kind.key} > %s")
        params.append(q.cursor)
    sql = (f"SELECT {kind.json_sql()} AS j, {kind.key} AS k FROM {kind.name} WHERE {' AND '.join(where)} "
           f"ORDER BY {kind.key} LIMIT %s")
    return sql, [*params, q.limit + 1]


def list_kind(kind: Kind):
    q = _query(kind.query)
    query = list_query(kind, g.caller.grants, q)
    if query is None:
        authorize("read", kind.name, None, kind.name)
    rows = store().transaction(lambda cur: cur.execute(*query).fetchall())
    rows, nxt = _page(rows, q.limit, lambda r: r["k"])
    body = f'{{"{kind.name}":[{",".join(r["j"] for r in rows)}],"next":{json.dumps(nxt)}}}'
    return Response(body, mimetype="application/json")


def get_kind(kind: Kind, ref: str):
    row = store().transaction(lambda cur: _find(cur, kind, ref))
    authorize("read", kind.name, kind.path(row), f"{kind.name}/{row['id']}")
    return jsonify(kind.view(row))


def create_kind(kind: Kind):
    body = _body(kind.create)
    values = body.model_dump()
    if kind.name == "servers" and body.hardware is not None:
        values["hardware"] = body.hardware.model_dump()
    elif kind.name == "servers":
        values["hardware"] = {}
    path = kind.path({"hostname": None, **values})
    authorize("create", kind.name, path, f"{kind.name}/{values[kind.key]}")
    cols = _columns(kind, {k: x for k, x in values.items() if x is not None})
    sql = (f"INSERT INTO {kind.name} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) RETURNING *")
    row = _mutate(f"{kind.name}.create", kind.name, lambda cur: cur.execute(sql, list(cols.values())).fetchone(), 201)
    return jsonify(kind.view(row)), 201


def patch_kind(kind: Kind, ref: str):
    body = _body(kind.patch)
    changes = body.model_dump(exclude_unset=True)
    bad = [k for k in kind.not_null if k in changes and changes[k] is None]
    if bad:
        raise ApiError(422, "invalid request", [{"field": k, "message": "may not be null"} for k in bad])
    row = store().transaction(lambda cur: _find(cur, kind, ref))
    name = f"{kind.name}/{row['id']}"
    authorize("update", kind.name, kind.path(row), name)
    authorize("update", kind.name, kind.path({**row, **changes}), name)  # and where it moves to

    def work(cur):
        sets = {**_columns(kind, changes)}
        if kind.updated_at:
            sets["updated_at"] = dt.datetime.now(dt.UTC)
        if kind.name == "servers" and "state" in changes:
            sets["state_changed_at"] = dt.datetime.now(dt.UTC)
        if not sets:
            return cur.execute(f"SELECT * FROM {kind.name} WHERE id = %s", (row["id"],)).fetchone()
        assign = ", ".join(f"{c} = %s" for c in sets)
        out = cur.execute(f"UPDATE {kind.name} SET {assign} WHERE id = %s RETURNING *", [*sets.values(), row["id"]]).fetchone()
        if out is None:
            raise ApiError(404, f"no such {kind.name[:-1]}", ref)
        return out
    return jsonify(kind.view(_mutate(f"{kind.name}.update", kind.name, work)))


def delete_kind(kind: Kind, ref: str):
    row = store().transaction(lambda cur: _find(cur, kind, ref))
    authorize("delete", kind.name, kind.path(row), f"{kind.name}/{row['id']}")

    def work(cur):
        if cur.execute(f"DELETE FROM {kind.name} WHERE id = %s RETURNING id", (row["id"],)).fetchone() is None:
            raise ApiError(404, f"no such {kind.name[:-1]}", ref)
        return {"id": row["id"]}
    _mutate(f"{kind.name}.delete", kind.name, work)
    return "", 204


for _kind in KINDS.values():
    bp.add_url_rule(f"/{_kind.name}", f"list_{_kind.name}", lambda k=_kind: list_kind(k), methods=["GET"])
    bp.add_url_rule(f"/{_kind.name}", f"create_{_kind.name}", lambda k=_kind: create_kind(k), methods=["POST"])
    bp.add_url_rule(f"/{_kind.name}/<ref>", f"get_{_kind.name}", lambda ref, k=_kind: get_kind(k, ref), methods=["GET"])
    bp.add_url_rule(f"/{_kind.name}/<ref>", f"patch_{_kind.name}", lambda ref, k=_kind: patch_kind(k, ref), methods=["PATCH"])
    bp.add_url_rule(f"/{_kind.name}/<ref>", f"delete_{_kind.name}", lambda ref, k=_kind: delete_kind(k, ref), methods=["DELETE"])


# -- kubeconfigs: sealed at rest (labcore.secretbox), read with their own verb ---------------------------
def _secret_key() -> bytes:
    return secretbox.load_or_create_key(current_app.config["LABD"].secret_key_path)


@bp.put("/clusters/<ref>/kubeconfig")
def put_kubeconfig(ref):
    kind = KINDS["clusters"]
    text = request.get_data(as_text=False)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid request", [{"field": "body", "message": "a kubeconfig is UTF-8 text"}]) from None
    if not decoded.strip() or "\x00" in decoded:
        raise ApiError(422, "invalid request", [{"field": "body", "message": "a kubeconfig is non-empty text"}])
    row = store().transaction(lambda cur: _find(cur, kind, ref))
    authorize("update", "clusters", kind.path(row), f"clusters/{row['id']}")
    sealed = secretbox.seal(_secret_key(), text, f"kubeconfig:{row['id']}".encode())
    _mutate("clusters.update-kubeconfig", "clusters", lambda cur: cur.execute(
        "UPDATE clusters SET kubeconfig = %s, updated_at = now() WHERE id = %s RETURNING id", (sealed, row["id"])).fetchone())
    return "", 204


@bp.get("/clusters/<ref>/kubeconfig")
def get_kubeconfig(ref):
    kind = KINDS["clusters"]
    row = store().transaction(lambda cur: _find(cur, kind, ref))
    authorize("read-kubeconfig", "clusters", kind.path(row), f"clusters/{row['id']}")
    if row["kubeconfig"] is None:
        raise ApiError(404, "this cluster has no kubeconfig", row["name"])
    try:
        text = secretbox.unseal(_secret_key(), row["kubeconfig"], f"kubeconfig:{row['id']}".encode())
    except secretbox.SecretError as exc:  # another secret.key, or a value copied from another cluster's row
        raise ApiError(409, "the stored kubeconfig cannot be opened", f"{exc}; PUT it again") from None
    store().transaction(lambda cur: audit(cur, g.caller.user, "clusters.read-kubeconfig", f"clusters/{row['id']}"))
    return Response(text, mimetype="text/plain")


# -- who am I, may I ---------------------------------------------------------------------------------------
@bp.post("/logout")
def logout():
    _mutate("logout", "tokens", lambda cur: cur.execute(
        "UPDATE tokens SET revoked_at = now() WHERE id = %s RETURNING id", (g.caller.token_id,)).fetchone())
    return "", 204


@bp.get("/whoami")
def whoami():
    return jsonify(user=g.caller.user, roles=g.caller.bindings, expires_at=_time(g.caller.expires_at))


class AccessReview(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    verb: sc.Verb
    resource: sc.Resource
    path: pydantic.constr(pattern=r"^[A-Za-z0-9._:-]{1,64}/[A-Za-z0-9._:-]{1,64}/[A-Za-z0-9._:-]{1,64}$") | None = None


@bp.get("/access-review")
def access_review():
    """May I? (like `kubectl auth can-i`): the caller's answer for a verb on a resource at a path."""
    q = _query(AccessReview)
    return jsonify(allowed=rbac.allowed(g.caller.grants, q.verb, q.resource, q.path if q.resource in rbac.SCOPED else None))


# -- tokens, users, roles, role bindings, audit: global resources (only an unscoped grant reaches them) ----
def _global(verb: str, resource: str, name: str | None = None) -> None:
    authorize(verb, resource, None, name or resource)


def _simple_list(resource: str, sql: str, params: list, view, order_key="id"):
    q = _query(sc.Query)
    _global("read", resource)
    where = ""
    if q.cursor is not None:
        where = f" WHERE {order_key}::text > %s"
        params = [*params, q.cursor]
    rows = store().transaction(lambda cur: cur.execute(f"SELECT * FROM ({sql}) AS x{where} ORDER BY {order_key}::text LIMIT %s",
                                                       [*params, q.limit + 1]).fetchall())
    rows, nxt = _page(rows, q.limit, lambda r: str(r[order_key]))
    return jsonify({resource: [view(r) for r in rows], "next": nxt})


def _token_view(r: dict) -> dict:
    p = _plain(r)
    return {"id": p["id"], "kind": p["kind"], "user": p["username"], "scope": p["scope"], "uses": p["uses_left"],
            "expires_at": p["expires_at"], "revoked_at": p["revoked_at"], "created_by": p["created_by"],
            "created_at": p["created_at"]}


def _uuid(ref: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(ref)
    except ValueError:
        raise ApiError(404, f"no such {what}", ref[:64]) from None


def _get_named(table: str, columns: str, ref: str, what: str) -> dict:
    """One row of a global resource named *ref* (users, roles), read access checked; 404 if none.
    *table* and *columns* are constants of the callers, never input."""
    _global("read", table, f"{table}/{ref}")
    row = store().transaction(lambda cur: cur.execute(f"SELECT {columns} FROM {table} WHERE name = %s", (ref,)).fetchone())
    if row is None:
        raise ApiError(404, f"no such {what}", ref[:64])
    return row


@bp.get("/tokens")
def list_tokens():
    return _simple_list("tokens", "SELECT * FROM tokens", [], _token_view)


@bp.post("/tokens")
def create_token():
    body = _body(sc.TokenCreate)
    _global("create", "tokens", "tokens")
    secret = auth.new_token(body.kind)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=body.ttl_seconds)
    user = g.caller.user if body.kind == "api" else None
    row = _mutate("tokens.create", "tokens", lambda cur: cur.execute(
        "INSERT INTO tokens (kind, hash, username, scope, uses_left, expires_at, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s) "
        "RETURNING *", (body.kind, auth.token_hash(secret), user, body.scope, body.uses, expires, g.caller.user)).fetchone(), 201)
    if body.kind != "api":  # a join token: the secret with labd's CA pin (labcore.enroll)
        from labcore.enroll import fingerprint, format_join

        secret = format_join(secret, fingerprint(current_app.config["LABD"].ca_path.read_bytes()))
    return jsonify({**_token_view(row), "token": secret}), 201


@bp.delete("/tokens/<ref>")
def revoke_token(ref):
    tid = _uuid(ref, "token")
    _global("delete", "tokens", f"tokens/{tid}")

    def work(cur):
        row = cur.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %s RETURNING id", (tid,)).fetchone()
        if row is None:
            raise ApiError(404, "no such token", ref)
        return row
    _mutate("tokens.delete", "tokens", work)
    return "", 204


def _user_view(r: dict) -> dict:
    p = _plain(r)
    return {"id": p["id"], "name": p["name"], "created_at": p["created_at"]}


@bp.get("/users")
def list_users():
    return _simple_list("users", "SELECT id, name, created_at FROM users", [], _user_view, "name")


@bp.get("/users/<ref>")
def get_user(ref):
    return jsonify(_user_view(_get_named("users", "id, name, created_at", ref, "user")))


@bp.post("/users")
def create_user():
    body = _body(sc.UserCreate)
    _global("create", "users", f"users/{body.name}")
    password = body.password or auth.new_password()
    hashed = auth.hash_password(password)  # outside the transaction: slow on purpose, and a retry would repeat it
    row = _mutate("users.create", "users", lambda cur: cur.execute(
        "INSERT INTO users (name, password_hash) VALUES (%s, %s) RETURNING id, name, created_at", (body.name, hashed)).fetchone(), 201)
    out = _user_view(row)
    if body.password is None:
        out["password"] = password
    return jsonify(out), 201


@bp.delete("/users/<ref>")
def delete_user(ref):
    _global("delete", "users", f"users/{ref}")
    if ref == g.caller.user:
        raise ApiError(409, "you cannot delete yourself")

    def work(cur):
        row = cur.execute("DELETE FROM users WHERE name = %s RETURNING id, name", (ref,)).fetchone()
        if row is None:
            raise ApiError(404, "no such user", ref[:64])
        cur.execute("DELETE FROM role_bindings WHERE username = %s", (ref,))
        cur.execute("UPDATE tokens SET revoked_at = now() WHERE username = %s AND revoked_at IS NULL", (ref,))
        return row
    _mutate("users.delete", "users", work)
    return "", 204


def _role_view(r: dict) -> dict:
    return {k: x for k, x in _plain(r).items() if k in ("name", "builtin", "description", "rules", "created_at")}


@bp.get("/roles")
def list_roles():
    return _simple_list("roles", "SELECT * FROM roles", [], _role_view, "name")


@bp.get("/roles/<ref>")
def get_role(ref):
    return jsonify(_role_view(_get_named("roles", "*", ref, "role")))


@bp.post("/roles")
def create_role():
    body = _body(sc.RoleCreate)
    _global("create", "roles", f"roles/{body.name}")
    rules = [r.model_dump() for r in body.rules]
    row = _mutate("roles.create", "roles", lambda cur: cur.execute(
        "INSERT INTO roles (name, description, rules) VALUES (%s, %s, %s) RETURNING *",
        (body.name, body.description, Jsonb(rules))).fetchone(), 201)
    return jsonify(_role_view(row)), 201


def _custom_role(cur, ref: str) -> dict:
    row = cur.execute("SELECT * FROM roles WHERE name = %s", (ref,)).fetchone()
    if row is None:
        raise ApiError(404, "no such role", ref[:64])
    if row["builtin"]:
        raise ApiError(409, "built-in roles cannot be changed", ref)
    return row


@bp.patch("/roles/<ref>")
def patch_role(ref):
    body = _body(sc.RolePatch)
    _global("update", "roles", f"roles/{ref}")
    changes = body.model_dump(exclude_unset=True, exclude_none=True)

    def work(cur):
        row = _custom_role(cur, ref)
        if "rules" in changes:
            row = cur.execute("UPDATE roles SET rules = %s WHERE name = %s RETURNING *", (Jsonb(changes["rules"]), ref)).fetchone()
        if "description" in changes:
            row = cur.execute("UPDATE roles SET description = %s WHERE name = %s RETURNING *", (changes["description"], ref)).fetchone()
        return row
    return jsonify(_role_view(_mutate("roles.update", "roles", work)))


@bp.delete("/roles/<ref>")
def delete_role(ref):
    _global("delete", "roles", f"roles/{ref}")

    def work(cur):
        row = _custom_role(cur, ref)
        if cur.execute("SELECT 1 FROM role_bindings WHERE role = %s LIMIT 1", (ref,)).fetchone():
            raise ApiError(409, "the role is bound to users: delete its role bindings first", ref)
        cur.execute("DELETE FROM roles WHERE name = %s", (ref,))
        return row
    _mutate("roles.delete", "roles", work)
    return "", 204


def _binding_view(r: dict) -> dict:
    p = _plain(r)
    return {"id": p["id"], "user": p["username"], "role": p["role"], "scope": p["scope"], "created_at": p["created_at"]}


@bp.get("/rolebindings")
def list_bindings():
    return _simple_list("rolebindings", "SELECT * FROM role_bindings", [], _binding_view)


@bp.post("/rolebindings")
def create_binding():
    body = _body(sc.RoleBindingCreate)
    _global("create", "rolebindings", f"rolebindings/{body.user}")

    def work(cur):
        if cur.execute("SELECT 1 FROM users WHERE name = %s", (body.user,)).fetchone() is None:
            raise ApiError(404, "no such user", body.user)
        if cur.execute("SELECT 1 FROM roles WHERE name = %s", (body.role,)).fetchone() is None:
            raise ApiError(404, "no such role", body.role)
        return cur.execute("INSERT INTO role_bindings (username, role, scope) VALUES (%s, %s, %s) RETURNING *",
                           (body.user, body.role, body.scope)).fetchone()
    return jsonify(_binding_view(_mutate("rolebindings.create", "rolebindings", work, 201))), 201


@bp.delete("/rolebindings/<ref>")
def delete_binding(ref):
    bid = _uuid(ref, "role binding")
    _global("delete", "rolebindings", f"rolebindings/{bid}")

    def work(cur):
        row = cur.execute("DELETE FROM role_bindings WHERE id = %s RETURNING id", (bid,)).fetchone()
        if row is None:
            raise ApiError(404, "no such role binding", ref)
        return row
    _mutate("rolebindings.delete", "rolebindings", work)
    return "", 204


def _parse_time(value: str | None, field: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "invalid request", [{"field": field, "message": "not an ISO 8601 time"}]) from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


@bp.get("/audit")
def list_audit():
    q = _query(sc.AuditQuery)
    _global("read", "audit")
    where, params = ["TRUE"], []
    for col in ("actor", "action"):
        if getattr(q, col) is not None:
            where.append(f"{col} = %s")
            params.append(getattr(q, col))
    if q.resource is not None:  # a prefix: `servers` finds every server's rows
        where.append("resource LIKE %s")
        params.append(rbac.like_escape(q.resource) + "%")
    for col, op in (("since", ">="), ("until", "<")):
        t = _parse_time(getattr(q, col), col)
        if t is not None:
            where.append(f"ts {op} %s")
            params.append(t)
    if q.cursor is not None:
        micros, _, rid = q.cursor.partition("-")
        where.append("(ts, id) < (%s, %s)")
        params += [EPOCH + dt.timedelta(microseconds=int(micros)), uuid.UUID(rid)]
    sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY ts DESC, id DESC LIMIT %s"
    rows = store().transaction(lambda cur: cur.execute(sql, [*params, q.limit + 1]).fetchall())
    rows, nxt = _page(rows, q.limit, lambda r: f"{(r['ts'] - EPOCH) // dt.timedelta(microseconds=1)}-{r['id'].hex}")
    return jsonify(audit=[_plain(r) for r in rows], next=nxt)
