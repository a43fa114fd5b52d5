"""labd's OpenAPI document: schemas generated from labd.schemas (pydantic), as the bastion's are
from labcore.schemas; the paths are built here from one table of operations, so that every route
the API has is described."""

from __future__ import annotations

import functools

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from labcore.schemas import ErrorBody
from labd import agent_api
from labd import schemas as sc
from labd.api import KINDS, REF_PATTERN, VIEWS, AccessReview

ERRORS = {"400": "no JSON body", "401": "no valid token", "403": "the caller's roles do not allow it (audited)",
          "404": "no such object", "409": "conflicts with what exists", "422": "invalid request",
          "413": "the body is larger than 2 MiB", "503": "database unavailable"}
BODY_MODELS = [sc.ServerCreate, sc.ServerPatch, sc.BastionCreate, sc.BastionPatch, sc.AgentCreate, sc.AgentPatch,
               sc.ClusterCreate, sc.ClusterPatch, sc.TokenCreate, sc.UserCreate, sc.RoleCreate, sc.RolePatch,
               sc.RoleBindingCreate, sc.LoginRequest, agent_api.ExecRequest, agent_api.LogsRequest]
ANSWER_MODELS = [ErrorBody, sc.ServerView, sc.ServerList, sc.BastionView, sc.BastionList, sc.AgentView, sc.AgentList,
                 sc.ClusterView, sc.ClusterList, sc.TokenView, sc.TokenList, sc.TokenCreated, sc.UserView, sc.UserCreated,
                 sc.UserList, sc.RoleView, sc.RoleList, sc.RoleBindingView, sc.RoleBindingList, sc.AuditView, sc.AuditList,
                 sc.LoginAnswer, sc.WhoAmI, agent_api.CommandCreated, agent_api.CommandState]
LISTS = {"servers": sc.ServerList, "bastions": sc.BastionList, "agents": sc.AgentList, "clusters": sc.ClusterList}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model_or_schema) -> dict:
    schema = _ref(model_or_schema) if isinstance(model_or_schema, type) else model_or_schema
    return {"content": {"application/json": {"schema": schema}}}


def _query(model: type[BaseModel]) -> list[dict]:
    props = model.model_json_schema()["properties"]
    out = []
    for name, schema in props.items():
        schema = {k: x for k, x in schema.items() if k not in ("title", "default")}
        if "anyOf" in schema:  # X | None: a query parameter is left out, never null
            schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
        p = {"name": name, "in": "query", "required": name in model.model_json_schema().get("required", []), "schema": schema}
        if schema.get("type") == "array":
            p.update(style="form", explode=True)
        out.append(p)
    return out


def _op(summary: str, ok: str, answer=None, *, body=None, params=(), errors=("401", "403", "422", "503"),
        auth: bool = True, text_answer: bool = False) -> dict:
    op: dict = {"summary": summary, "responses": {}}
    if answer is not None:
        op["responses"][ok] = {"description": "ok", **({"content": {"text/plain": {"schema": {"type": "string"}}}}
                                                       if text_answer else _json(answer))}
    else:
        op["responses"][ok] = {"description": "done"}
    for code in errors:
        op["responses"][code] = {"description": ERRORS[code], **_json(ErrorBody)}
    if body is not None:
        op["responses"]["413"] = {"description": ERRORS["413"], **_json(ErrorBody)}
        op["requestBody"] = {"required": True, **(_json(body) if isinstance(body, type) else body)}
    if params:
        op["parameters"] = list(params)
    op["security"] = [{"bearer": []}] if auth else []
    return op


def _path_param(name: str, pattern: str = REF_PATTERN) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


@functools.cache
def document() -> dict:
    _, top = models_json_schema([(m, "validation") for m in BODY_MODELS] + [(m, "serialization") for m in ANSWER_MODELS],
                                ref_template="#/components/schemas/{model}")
    ref = _path_param("ref")
    all_errors = ("400", "401", "403", "404", "409", "422", "503")
    paths: dict = {
        "/healthz": {"get": _op("liveness", "200", {"type": "object"}, errors=(), auth=False)},
        "/readyz": {"get": _op("readiness: the database answers", "200", {"type": "object"}, errors=("503",), auth=False)},
        "/metrics": {"get": _op("Prometheus metrics", "200", True, errors=(), auth=False, text_answer=True)},
        "/api/openapi.json": {"get": _op("this document", "200", {"type": "object"}, errors=(), auth=False)},
        "/api/v1/ca": {"get": _op("labd's CA certificate (PEM), for pinning on first login", "200", True, errors=(),
                                  auth=False, text_answer=True)},
        "/api/v1/login": {"post": _op("log in: an API token for the user", "200", sc.LoginAnswer, body=sc.LoginRequest,
                                      errors=("400", "401", "422", "503"), auth=False)},
        "/api/v1/logout": {"post": _op("revoke the presented token", "204", errors=("401", "503"))},
        "/api/v1/whoami": {"get": _op("the caller, its role bindings and its token's expiry", "200", sc.WhoAmI, errors=("401", "503"))},
        "/api/v1/access-review": {"get": _op("may the caller do verb on resource at path?", "200",
                                             {"type": "object", "properties": {"allowed": {"type": "boolean"}}, "required": ["allowed"]},
                                             params=_query(AccessReview), errors=("401", "422", "503"))},
    }
    for name, kind in KINDS.items():
        paths[f"/api/v1/{name}"] = {
            "get": _op(f"list {name} (only those in the caller's scope)", "200", LISTS[name], params=_query(kind.query)),
            "post": _op(f"create a {name[:-1]}", "201", VIEWS[name], body=kind.create, errors=all_errors),
        }
        paths[f"/api/v1/{name}/{{ref}}"] = {
            "get": _op(f"one {name[:-1]} (id or {' or '.join(kind.refs)})", "200", VIEWS[name], params=[ref],
                       errors=("401", "403", "404", "503")),
            "patch": _op(f"change a {name[:-1]}", "200", VIEWS[name], body=kind.patch, params=[ref], errors=all_errors),
            "delete": _op(f"delete a {name[:-1]}", "204", params=[ref], errors=("401", "403", "404", "503")),
        }
    paths["/api/v1/clusters/{ref}/kubeconfig"] = {
        "put": _op("store the cluster's kubeconfig (sealed at rest)", "204", params=[ref], errors=all_errors,
                   body={"content": {"text/plain": {"schema": {"type": "string", "minLength": 1}}}}),
        "get": _op("the cluster's kubeconfig (verb read-kubeconfig; audited)", "200", True, params=[ref],
                   errors=("401", "403", "404", "409", "503"), text_answer=True),
    }
    uuid_param = _path_param("ref", sc.UUID_PATTERN)
    name_param = _path_param("ref", sc.NAME_PATTERN)
    q = _query(sc.Query)
    paths["/api/v1/tokens"] = {
        "get": _op("list tokens (never their secrets)", "200", sc.TokenList, params=q),
        "post": _op("make a token: the secret is in this answer only", "201", sc.TokenCreated, body=sc.TokenCreate, errors=all_errors)}
    paths["/api/v1/tokens/{ref}"] = {"delete": _op("revoke a token", "204", params=[uuid_param], errors=("401", "403", "404", "503"))}
    paths["/api/v1/users"] = {
        "get": _op("list users", "200", sc.UserList, params=q),
        "post": _op("create a user (without a password: one is made and answered once)", "201", sc.UserCreated,
                    body=sc.UserCreate, errors=all_errors)}
    paths["/api/v1/users/{ref}"] = {
        "get": _op("one user", "200", sc.UserView, params=[name_param], errors=("401", "403", "404", "503")),
        "delete": _op("delete a user, its role bindings, and revoke its tokens", "204", params=[name_param],
                      errors=("401", "403", "404", "409", "503"))}
    paths["/api/v1/roles"] = {"get": _op("list roles", "200", sc.RoleList, params=q),
                              "post": _op("create a role", "201", sc.RoleView, body=sc.RoleCreate, errors=all_errors)}
    paths["/api/v1/roles/{ref}"] = {
        "get": _op("one role", "200", sc.RoleView, params=[name_param], errors=("401", "403", "404", "503")),
        "patch": _op("change a role (not a built-in one)", "200", sc.RoleView, body=sc.RolePatch, params=[name_param], errors=all_errors),
        "delete": _op("delete a role (not built-in, not bound)", "204", params=[name_param], errors=("401", "403", "404", "409", "503"))}
    paths["/api/v1/rolebindings"] = {
        "get": _op("list role bindings", "200", sc.RoleBindingList, params=q),
        "post": _op("bind a role to a user within a scope", "201", sc.RoleBindingView, body=sc.RoleBindingCreate, errors=all_errors)}
    paths["/api/v1/rolebindings/{ref}"] = {"delete": _op("delete a role binding", "204", params=[uuid_param],
                                                          errors=("401", "403", "404", "503"))}
    paths["/api/v1/audit"] = {"get": _op("the audit log, newest first", "200", sc.AuditList, params=_query(sc.AuditQuery))}
    # -- bastions and agents joining, commands routed to bastions (labd/link_api.py, docs/labd-link.md)
    from labd import link_api

    paths["/api/v1/enroll"] = {"post": _op(
        "enroll a bastion or an agent: a join token and a CSR; answers the signed certificate (every refusal audited)",
        "201", link_api.EnrollAnswer.model_json_schema(), body={"content": {"application/json": {
            "schema": link_api.EnrollRequest.model_json_schema()}}},
        errors=("400", "401", "403", "422", "503"), auth=False)}
    action_param = {"name": "action", "in": "path", "required": True,
                    "schema": {"type": "string", "enum": [a for a in link_api.ACTIONS if a != "logs"]}}
    paths["/api/v1/servers/{ref}/{action}"] = {"post": _op(
        "send install|reprovision|cancel|forget|debug to the bastion that holds the server; answers the bastion's answer "
        "unchanged (202 queued with queue=true while it is offline; 503 when it is offline; 504 when it does not answer)",
        "200", {"type": "object"}, body={"content": {"application/json": {"schema": link_api.RoutedCommand.model_json_schema()}}},
        params=[ref, action_param], errors=all_errors)}
    paths["/api/v1/servers/{ref}/logs"] = {"post": _op(
        "the server's install log, read on the bastion that holds it: the last `tail` lines, with follow=true then "
        "the live progress until the install ends, as the command's output rows (GET /api/v1/commands/{ref}?after=N); "
        "503 when the bastion is offline", "202", link_api.CommandStarted.model_json_schema(),
        body={"content": {"application/json": {"schema": link_api.LogsCommand.model_json_schema()}}},
        params=[ref], errors=all_errors)}
    paths["/api/v1/commands/{ref}"] = {"get": _op("a routed command: its state and the bastion's answer (a logs command: "
                                                  "also its output rows after ?after=N)", "200",
                                                  link_api.CommandView.model_json_schema(), params=[uuid_param],
                                                  errors=("401", "403", "404", "503"))}
    # lab-agent (labd/agent_api.py, docs/agent.md)
    for action, what in (("approve", "accept a pending agent"), ("revoke", "revoke an agent: its certificates are refused")):
        paths[f"/api/v1/agents/{{ref}}/{action}"] = {"post": _op(what, "200", sc.AgentView, params=[ref],
                                                                 errors=("401", "403", "404", "409", "503"))}
    paths["/api/v1/agents/{ref}/exec"] = {"post": _op("run an argv on the agent's host (verb exec on servers; audited)", "202",
                                                      agent_api.CommandCreated, body=agent_api.ExecRequest, params=[ref],
                                                      errors=all_errors)}
    paths["/api/v1/agents/{ref}/logs"] = {"post": _op("relay the host's journal (verb exec on servers)", "202",
                                                      agent_api.CommandCreated, body=agent_api.LogsRequest, params=[ref],
                                                      errors=all_errors)}
    paths["/api/v1/commands/{ref}/cancel"] = {"post": _op("cancel an agent's command (its process group is killed) or a bastion's log follow", "200",
                                                          agent_api.CommandState, params=[uuid_param],
                                                          errors=("401", "403", "404", "503"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "labd", "version": "1", "description": "The central daemon of a lab-platform lab (docs/labd.md)."},
        "paths": paths,
        "components": {"schemas": top.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
