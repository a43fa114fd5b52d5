"""Role-based access control: a rule grants verbs on resources within a scope; a role binding gives
a user a role within a scope. A request is allowed when one (rule, binding) pair names its verb
and resource and both scopes match the object; anything else is denied (deny by default).

Scopes are globs over ``cloud/environment/server`` (the seed's ``action:cloud:env:server``), matched
segment by segment with ``*`` and ``?``; ``*`` alone matches everything. Servers, bastions, agents
and clusters have a place (``cloud/environment/<hostname|name>``); users, roles, role bindings,
tokens and the audit log have none: only an unscoped grant (both scopes ``*``) reaches them.

The built-in roles (docs/labd.md prints this matrix; tests/labd/test_rbac.py checks it over HTTP):
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

VERBS = ("read", "create", "update", "delete", "read-kubeconfig", "exec")
RESOURCES = ("servers", "bastions", "agents", "clusters", "tokens", "users", "roles", "rolebindings", "audit")
SCOPED = ("servers", "bastions", "agents", "clusters")
FLEET = ("servers", "bastions", "agents", "clusters")

BUILTIN_ROLES: dict[str, dict] = {
    "viewer": {"description": "read servers, bastions, agents and clusters (not kubeconfigs)",
               "rules": [{"verbs": ["read"], "resources": list(FLEET), "scope": "*"}]},
    "operator": {"description": "viewer, plus change servers, agents and clusters, read kubeconfigs, run commands on servers",
                 "rules": [{"verbs": ["read"], "resources": list(FLEET), "scope": "*"},
                           {"verbs": ["create", "update", "delete"], "resources": ["servers", "agents", "clusters"], "scope": "*"},
                           {"verbs": ["read-kubeconfig"], "resources": ["clusters"], "scope": "*"},
                           {"verbs": ["exec"], "resources": ["servers"], "scope": "*"}]},
    "admin": {"description": "everything", "rules": [{"verbs": ["*"], "resources": ["*"], "scope": "*"}]},
    "auditor": {"description": "read everything but secrets: the audit log, users, roles, bindings, tokens' metadata, the fleet",
                "rules": [{"verbs": ["read"], "resources": ["*"], "scope": "*"}]},
}


def verbs_of(resource: str) -> tuple[str, ...]:
    """The verbs that mean something for a resource (the matrix' columns)."""
    if resource == "clusters":
        return ("read", "create", "update", "delete", "read-kubeconfig")
    if resource == "servers":
        return ("read", "create", "update", "delete", "exec")
    if resource == "audit":
        return ("read",)
    if resource in ("tokens", "users", "rolebindings"):
        return ("read", "create", "delete")
    return ("read", "create", "update", "delete")


def scope_matches(scope: str, path: str | None) -> bool:
    if scope == "*":
        return True
    if path is None:
        return False
    segs, parts = scope.split("/"), path.split("/")
    return len(segs) == len(parts) == 3 and all(fnmatchcase(p, s) for s, p in zip(segs, parts, strict=True))


@dataclass(frozen=True)
class Grant:
    verbs: frozenset[str]
    resources: frozenset[str]
    scopes: tuple[str, ...]  # the rule's scope and the binding's: both must match

    def names(self, verb: str, resource: str) -> bool:
        return (verb in self.verbs or "*" in self.verbs) and (resource in self.resources or "*" in self.resources)


def grants(bindings: list[tuple[list[dict], str]]) -> list[Grant]:
    """From (role rules, binding scope) pairs."""
    return [Grant(frozenset(r["verbs"]), frozenset(r["resources"]), (r.get("scope", "*"), scope))
            for rules, scope in bindings for r in rules]


def allowed(gs: list[Grant], verb: str, resource: str, path: str | None) -> bool:
    return any(g.names(verb, resource) and all(scope_matches(s, path) for s in g.scopes) for g in gs)


def like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (backslash is PostgreSQL's default escape)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(glob: str) -> str:
    return like_escape(glob).replace("*", "%").replace("?", "_")


def sql_filter(gs: list[Grant], verb: str, resource: str, columns: tuple[str, str, str]) -> tuple[str, list] | None:
    """A WHERE clause (and its parameters) that keeps the rows of a scoped resource the grants
    reach, or None when no grant names the verb and resource at all (the caller answers 403)."""
    ors, params = [], []
    for g in gs:
        if not g.names(verb, resource):
            continue
        ands = []
        for scope in g.scopes:
            if scope == "*":
                continue
            for col, seg in zip(columns, scope.split("/"), strict=True):
                if seg != "*":
                    ands.append(f"{col} LIKE %s")
                    params.append(_like(seg))
        if not ands:
            return "TRUE", []
        ors.append("(" + " AND ".join(ands) + ")")
    if not ors:
        return None
    return "(" + " OR ".join(ors) + ")", params


def matrix() -> dict[str, dict[str, dict[str, bool]]]:
    """role -> resource -> verb -> allowed, for an unscoped binding of each built-in role."""
    out = {}
    for role, spec in BUILTIN_ROLES.items():
        gs = grants([(spec["rules"], "*")])
        out[role] = {res: {verb: allowed(gs, verb, res, "c/e/s" if res in SCOPED else None) for verb in verbs_of(res)}
                     for res in RESOURCES}
    return out


def matrix_markdown() -> str:
    lines = ["| resource | verb | " + " | ".join(BUILTIN_ROLES) + " |", "|---|---|" + "---|" * len(BUILTIN_ROLES)]
    m = matrix()
    for res in RESOURCES:
        for verb in verbs_of(res):
            lines.append(f"| {res} | {verb} | " + " | ".join("yes" if m[r][res][verb] else "-" for r in BUILTIN_ROLES) + " |")
    return "\n".join(lines)
