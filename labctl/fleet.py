"""labd's resources as labctl shows them: API paths, list keys, table columns and selectors, used by
`labctl get|describe|delete` when a labd is configured, and `labctl create user|role|token|rolebinding`.

A selector ``-l KEY=VALUE`` becomes a query parameter of the list (labd filters; for servers a key
that is not a field is a label, ``label=KEY=VALUE``); ``KEY!=VALUE`` is applied here, to the answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import click

from labctl import errors, output
from labctl.context import Ctx, output_option, pass_ctx
from labctl.output import Column, age, hw_summary


def _labels(r: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((r.get("labels") or {}).items()))


def _name(r: dict[str, Any]) -> Any:
    return r.get("name") or r.get("username") or r.get("id")


@dataclass(frozen=True)
class Resource:
    plural: str
    singular: str
    columns: list[Column]
    wide: list[Column] = field(default_factory=list)
    #: list filters labd knows (a selector key outside them is a label for servers, else refused)
    filters: tuple[str, ...] = ()
    labels: bool = False

    @property
    def path(self) -> str:
        return f"/api/v1/{self.plural}"


SERVER_COLUMNS: list[Column] = [
    ("NAME", lambda m: m.get("hostname")), ("MAC", lambda m: m.get("mac")), ("STATE", lambda m: m.get("state")),
    ("ROLE", lambda m: m.get("role")), ("OS", lambda m: m.get("os")), ("BASTION", lambda m: m.get("bastion")),
    ("CLOUD", lambda m: m.get("cloud")), ("ENV", lambda m: m.get("environment")), ("IP", lambda m: m.get("ip")),
]
_SEEN: Column = ("LAST SEEN", lambda r: age(r.get("last_seen_at")))
_PLACE: list[Column] = [("CLOUD", lambda r: r.get("cloud")), ("ENV", lambda r: r.get("environment"))]

RESOURCES: dict[str, Resource] = {r.plural: r for r in [
    Resource("servers", "server", SERVER_COLUMNS,
             [("LABELS", _labels), ("HARDWARE", hw_summary), ("INSTALLED", lambda m: m.get("installed_at")), _SEEN],
             ("cloud", "environment", "bastion", "state", "role", "os"), labels=True),
    Resource("bastions", "bastion", [("NAME", _name), *_PLACE, ("STATUS", lambda r: r.get("status")),
                                     ("MACHINES", lambda r: r.get("machines")), ("LAG", lambda r: r.get("lag")), _SEEN,
                                     ("VERSION", lambda r: r.get("version"))],
             [("ID", lambda r: r.get("id")), ("JOINED", lambda r: r.get("created_at"))], ("cloud", "environment")),
    Resource("agents", "agent", [("HOSTNAME", lambda r: r.get("hostname")), ("SERVER", lambda r: r.get("server")),
                                 ("STATUS", lambda r: r.get("status")), _SEEN],
             [("CLOUD", lambda r: r.get("cloud")), ("ENV", lambda r: r.get("environment")),
              ("VERSION", lambda r: r.get("version"))], ("cloud", "environment")),
    Resource("clusters", "cluster", [("NAME", _name), *_PLACE, ("MEMBERS", lambda r: len(r.get("members") or [])),
                                     ("KUBECONFIG", lambda r: "yes" if r.get("has_kubeconfig") else "no")],
             [("MEMBER NAMES", lambda r: ",".join(map(str, r.get("members") or [])))], ("cloud", "environment")),
    Resource("users", "user", [("NAME", _name), ("CREATED", lambda r: r.get("created_at"))]),
    Resource("roles", "role", [("NAME", _name), ("BUILTIN", lambda r: "yes" if r.get("builtin") else ""),
                               ("RULES", lambda r: len(r.get("rules") or []))],
             [("DESCRIPTION", lambda r: r.get("description"))]),
    Resource("rolebindings", "rolebinding", [("ID", lambda r: r.get("id")), ("USER", lambda r: r.get("user")),
                                             ("ROLE", lambda r: r.get("role")), ("SCOPE", lambda r: r.get("scope"))]),
    Resource("tokens", "token", [("ID", lambda r: r.get("id")), ("KIND", lambda r: r.get("kind")),
                                 ("USER", lambda r: r.get("user")), ("SCOPE", lambda r: r.get("scope")),
                                 ("USES LEFT", lambda r: r.get("uses")), ("EXPIRES", lambda r: r.get("expires_at")),
                                 ("REVOKED", lambda r: r.get("revoked_at"))],
             [("CREATED", lambda r: r.get("created_at")), ("BY", lambda r: r.get("created_by"))]),
    Resource("audit", "audit", [("TIME", lambda r: r.get("ts")), ("ACTOR", lambda r: r.get("actor")),
                                ("ACTION", lambda r: r.get("action")), ("RESOURCE", lambda r: r.get("resource")),
                                ("OUTCOME", lambda r: r.get("outcome")), ("STATUS", lambda r: r.get("status"))],
             [("DETAIL", lambda r: r.get("detail"))], ("actor", "action", "resource", "since", "until")),
]}
#: every name labctl accepts for a labd resource: plural, singular and short forms
ALIASES: dict[str, str] = {
    **{r.plural: r.plural for r in RESOURCES.values()}, **{r.singular: r.plural for r in RESOURCES.values()},
    "srv": "servers", "rb": "rolebindings",
}
_FIELD_ALIASES = {"env": "environment"}


def resource(name: str) -> Resource:
    return RESOURCES[ALIASES[name]]


def query(res: Resource, requirements: list[tuple[str, bool, str]], flags: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """(query parameters, the requirements left to check here) of ``-l`` selectors and flags."""
    params: dict[str, Any] = {k: v for k, v in flags.items() if v}
    labels: list[str] = []
    local = []
    for key, equal, value in requirements:
        key = _FIELD_ALIASES.get(key, key)
        if not equal:
            local.append((key, value))
        elif key in res.filters:
            params[key] = value
        elif res.labels:
            labels.append(f"{key}={value}")
        else:
            known = ", ".join(res.filters) or "none"
            raise errors.UsageError(f"{res.plural} cannot be selected by {key!r}", f"selector keys: {known}")
    if labels:
        params["label"] = labels
    return params, local


def _value(res: Resource, r: dict[str, Any], key: str) -> str:
    if key not in r and res.labels:
        return str((r.get("labels") or {}).get(key) or "")
    v = r.get(key)
    return "" if v is None else str(v)


def get(obj: Ctx, name: str, item: str | None, requirements: list, flags: dict[str, Any]) -> None:
    """`labctl get RESOURCE [NAME]` against labd."""
    res, client, fmt = resource(name), obj.labd, obj.output
    if item:
        if requirements or any(flags.values()):
            raise errors.UsageError(f"name a {res.singular} or select, not both")
        one = client.get(f"{res.path}/{quote(item, safe='')}")
        output.emit(one, fmt, lambda: output.print_table([one], res.columns + (res.wide if fmt == "wide" else [])))
        return
    params, local = query(res, requirements, flags)
    rows = [r for r in client.pages(res.path, res.plural, **params)
            if all(_value(res, r, k) != v for k, v in local)]
    if not rows and fmt not in ("json", "yaml"):
        click.echo(f"No {res.plural} found.", err=True)
        return
    output.emit({res.plural: rows}, fmt, lambda: output.print_table(rows, res.columns + (res.wide if fmt == "wide" else [])))


def describe(obj: Ctx, name: str, item: str) -> None:
    """`labctl describe RESOURCE NAME` against labd: every field, one per line (servers as machines
    are described, plus where the server belongs)."""
    res = resource(name)
    one = obj.labd.get(f"{res.path}/{quote(item, safe='')}")
    if obj.output in ("json", "yaml"):
        output.emit(one, obj.output, lambda: None)
        return
    if res.plural == "servers":
        output.describe({**one, "events": one.get("events") or []}, "table")
        click.echo("Placement:")
        for key in ("id", "bastion", "cloud", "environment"):
            click.echo(f"  {key.capitalize() + ':':<16}{one.get(key) or '-'}")
        click.echo(f"  {'Labels:':<16}{_labels(one) or '-'}")
        return
    sys.stdout.write(output.dump(one, "yaml"))


def delete(obj: Ctx, name: str, item: str, ignore_not_found: bool) -> None:
    res = resource(name)
    try:
        obj.labd.delete(f"{res.path}/{quote(item, safe='')}")
    except errors.NotFound:
        if ignore_not_found:
            return
        raise
    click.echo(f"{res.singular} {item} deleted")


# -- create ------------------------------------------------------------------------------------
@click.group()
def create() -> None:
    """Create labd users, roles, role bindings and tokens (needs a labd: labctl login URL)."""


@create.command("user")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin "
              "(default: labd makes one up and it is printed once).")
@click.option("--role", "roles", multiple=True, metavar="ROLE", help="Bind this role to the user, scope * (repeatable; "
              "for a narrower scope: labctl create rolebinding).")
@output_option
@pass_ctx
def create_user(obj: Ctx, name: str, password_stdin: bool, roles: tuple[str, ...]) -> None:
    """Create the user NAME (and bind ROLEs to it)."""
    body: dict[str, Any] = {"name": name}
    if password_stdin:
        body["password"] = sys.stdin.readline().rstrip("\r\n")
    made = obj.labd.post(RESOURCES["users"].path, body)
    made["rolebindings"] = [obj.labd.post(RESOURCES["rolebindings"].path, {"user": name, "role": r}) for r in roles]
    output.emit(made, obj.output, lambda: click.echo(
        f"user {name} created" + (f" with role(s) {', '.join(roles)}" if roles else "")
        + (f"\npassword: {made['password']}  (shown once)" if made.get("password") else "")))


def _rule(text: str) -> dict[str, Any]:
    verbs, resources, scope = (text.split(":", 2) + ["", ""])[:3]
    if not verbs or not resources:
        raise errors.UsageError(f"invalid rule {text!r}", "VERB[,VERB]:RESOURCE[,RESOURCE][:SCOPE], e.g. read:servers:lab1/prod/*")
    return {"verbs": verbs.split(","), "resources": resources.split(","), "scope": scope or "*"}


@create.command("role")
@click.argument("name")
@click.option("--rule", "rules", multiple=True, required=True, metavar="VERBS:RESOURCES[:SCOPE]",
              help="A rule: comma-separated verbs and resources and a scope glob over cloud/environment/server "
                   "(default *); repeatable.")
@click.option("--description", default="", help="What the role is for.")
@output_option
@pass_ctx
def create_role(obj: Ctx, name: str, rules: tuple[str, ...], description: str) -> None:
    """Create the role NAME from its rules."""
    made = obj.labd.post(RESOURCES["roles"].path, {"name": name, "description": description, "rules": [_rule(r) for r in rules]})
    output.emit(made, obj.output, lambda: click.echo(f"role {name} created"))


@create.command("rolebinding")
@click.option("--user", required=True, metavar="NAME")
@click.option("--role", required=True, metavar="ROLE")
@click.option("--scope", default="*", show_default=True, metavar="GLOB", help="cloud/environment/server glob the role "
              "holds in, e.g. lab1/prod/*.")
@output_option
@pass_ctx
def create_rolebinding(obj: Ctx, user: str, role: str, scope: str) -> None:
    """Give the user USER the role ROLE (in SCOPE); prints the binding's id (labctl delete rolebinding ID)."""
    made = obj.labd.post(RESOURCES["rolebindings"].path, {"user": user, "role": role, "scope": scope})
    output.emit(made, obj.output, lambda: click.echo(f"role {role} bound to {user} in {scope}: {made.get('id')}"))


@create.command("token")
@click.option("--kind", type=click.Choice(["api", "bastion", "agent"]), default="api", show_default=True)
@click.option("--ttl", "ttl_seconds", type=click.IntRange(60, 366 * 86400), default=3600, show_default=True, metavar="SECONDS",
              help="Lifetime of the token.")
@click.option("--uses", type=click.IntRange(1), metavar="N", help="How many times a join token may be used "
              "(default: any number until it expires).")
@click.option("--scope", default="*", show_default=True, metavar="GLOB", help="cloud/environment/server glob it is valid for.")
@output_option
@pass_ctx
def create_token(obj: Ctx, kind: str, ttl_seconds: int, uses: int | None, scope: str) -> None:
    """Create a token; its secret is printed once (labd keeps only its hash)."""
    made = obj.labd.post(RESOURCES["tokens"].path, {"kind": kind, "ttl_seconds": ttl_seconds, "uses": uses, "scope": scope})
    output.emit(made, obj.output, lambda: click.echo(made.get("token") or ""))
    if obj.output not in ("json", "yaml"):
        click.echo(f"{kind} token {made.get('id', '')} expires {made.get('expires_at', '?')}; "
                   "the secret above is not shown again", err=True)
