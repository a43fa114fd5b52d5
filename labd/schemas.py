"""labd's request and answer models (pydantic); the OpenAPI document is generated from them.

They reuse labcore.schemas' field types (MAC, host name, role, OS, SSH key, disk, hardware), so a
server in labd is validated by the very rules a bastion applies to a machine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from labcore import schemas as s
from labcore import validate as v
from labcore.schemas import Hardware, Hostname, Int, Loose, Mac, OsName, Role, SshKey, StoredState, Strict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
#: a scope glob: `*`, or cloud/environment/server with `*` and `?` wildcards in each segment
SCOPE_PATTERN = r"^(\*|[A-Za-z0-9._*?-]{1,64}/[A-Za-z0-9._*?-]{1,64}/[A-Za-z0-9._*?:-]{1,64})$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._-]{0,63}$"
LABEL_SELECTOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}=[A-Za-z0-9._-]{0,63}$"
#: a list's cursor: the sort key of the previous page's last item (a MAC, a name, an id)
CURSOR_PATTERN = r"^[A-Za-z0-9._:-]{1,253}$"
#: the audit log's: microseconds since the epoch and the row's id (hex) of the previous page's last row
AUDIT_CURSOR_PATTERN = r"^[0-9]{1,16}-[0-9a-f]{32}$"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Scope = Annotated[str, StringConstraints(pattern=SCOPE_PATTERN), Field(examples=["*", "lab1/prod/*"])]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN)]


def _labels_schema(schema: dict) -> None:
    # every key must match (pydantic publishes patternProperties, which leaves other keys unconstrained)
    schema.pop("patternProperties", None)
    schema["propertyNames"] = {"pattern": LABEL_KEY_PATTERN, "maxLength": 63}
    schema["additionalProperties"] = {"type": "string", "pattern": LABEL_VALUE_PATTERN}


Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=32, json_schema_extra=_labels_schema)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=256, pattern=r"^[^\x00]*$")]
Ip = Annotated[str, StringConstraints(max_length=45, pattern=r"^[0-9A-Fa-f.:]{2,45}$")]
Verb = Literal["read", "create", "update", "delete", "read-kubeconfig", "exec"]
Resource = Literal["servers", "bastions", "agents", "clusters", "tokens", "users", "roles", "rolebindings", "audit"]
Text = s.Text


# -- requests ----------------------------------------------------------------------------------------
class ServerCreate(Strict):
    mac: Mac
    cloud: Name
    environment: Name
    hostname: Hostname | None = None
    role: Role | None = None
    os: OsName | None = None
    disk: s.Disk = ""
    ssh_keys: list[SshKey] = Field(default_factory=list, max_length=v.MAX_SSH_KEYS)
    ip: Ip | None = None
    hardware: Hardware | None = None
    state: StoredState = "discovered"
    bastion: Name | None = None
    labels: Labels = Field(default_factory=dict)


# In the patches, a field left out keeps its value; null clears a field that may be empty (a host
# name, a role); fields that are never empty (cloud, state, labels) take no null.
class ServerPatch(Strict):
    cloud: Name = None
    environment: Name = None
    hostname: Hostname | None = None
    role: Role | None = None
    os: OsName | None = None
    disk: s.Disk = None
    ssh_keys: list[SshKey] = Field(None, max_length=v.MAX_SSH_KEYS)
    ip: Ip | None = None
    state: StoredState = None
    bastion: Name | None = None
    labels: Labels = None


class BastionCreate(Strict):
    name: Name
    cloud: Name
    environment: Name


class BastionPatch(Strict):
    cloud: Name = None
    environment: Name = None


class AgentCreate(Strict):
    hostname: Hostname
    cloud: Name
    environment: Name
    server: Hostname | None = None


class AgentPatch(Strict):
    status: Literal["pending", "active", "revoked", "offline"] = None
    server: Hostname | None = None


class ClusterCreate(Strict):
    name: Name
    cloud: Name
    environment: Name
    members: list[Hostname] = Field(default_factory=list, max_length=1000)


class ClusterPatch(Strict):
    members: list[Hostname] = Field(None, max_length=1000)


class TokenCreate(Strict):
    kind: Literal["api", "bastion", "agent"]
    ttl_seconds: Int(60, 366 * 86400) = 3600
    uses: Int(1, 1_000_000) | None = None
    scope: Scope = "*"


class UserCreate(Strict):
    name: Name
    #: left out: labd makes one up and answers it once as `password`
    password: Password | None = None


class Rule(Strict):
    verbs: list[Literal[Verb, "*"]] = Field(min_length=1, max_length=8)
    resources: list[Literal[Resource, "*"]] = Field(min_length=1, max_length=12)
    scope: Scope = "*"


class RoleCreate(Strict):
    name: Name
    description: Text = ""
    rules: list[Rule] = Field(min_length=1, max_length=64)


class RolePatch(Strict):
    description: Text = None
    rules: list[Rule] = Field(None, min_length=1, max_length=64)


class RoleBindingCreate(Strict):
    user: Name
    role: Name
    scope: Scope = "*"


class LoginRequest(Strict):
    username: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]


# -- list queries (query strings: values arrive as text) ---------------------------------------------
class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    cursor: Annotated[str, StringConstraints(pattern=CURSOR_PATTERN)] | None = None


class ServerQuery(Query):
    cloud: Name | None = None
    environment: Name | None = None
    bastion: Name | None = None
    state: StoredState | None = None
    role: Role | None = None
    os: OsName | None = None
    label: list[Annotated[str, StringConstraints(pattern=LABEL_SELECTOR_PATTERN)]] = Field(default_factory=list, max_length=16)


class ScopedQuery(Query):
    cloud: Name | None = None
    environment: Name | None = None


class AuditQuery(Query):
    cursor: Annotated[str, StringConstraints(pattern=AUDIT_CURSOR_PATTERN)] | None = None
    actor: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")] | None = None
    action: Annotated[str, StringConstraints(pattern=r"^[a-z-]{1,32}(\.[a-z-]{1,32})?$")] | None = None
    resource: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] | None = None
    since: Annotated[str, Field(json_schema_extra={"format": "date-time"})] | None = None
    until: Annotated[str, Field(json_schema_extra={"format": "date-time"})] | None = None


# -- answers -----------------------------------------------------------------------------------------
class ServerView(s.MachineView):
    id: str
    bastion: str | None
    cloud: str
    environment: str
    labels: dict[str, str]


class BastionView(Loose):
    id: str
    name: str
    cloud: str
    environment: str
    status: Literal["never-connected", "online", "offline"]
    last_seen_at: str | None
    version: str | None
    created_at: str
    #: machines the bastion reported (issue 17)
    machines: int = 0
    #: events the bastion held that labd had not acknowledged, at its last batch
    lag: int = 0


class AgentView(Loose):
    id: str
    hostname: str
    server: str | None
    cloud: str
    environment: str
    status: Literal["pending", "active", "revoked", "offline"]
    last_seen_at: str | None
    version: str | None
    created_at: str


class ClusterView(Loose):
    id: str
    name: str
    cloud: str
    environment: str
    members: list[str]
    has_kubeconfig: bool
    created_at: str
    updated_at: str


class TokenView(Loose):
    id: str
    kind: Literal["api", "bastion", "agent"]
    user: str | None
    scope: str
    uses: int | None
    expires_at: str
    revoked_at: str | None
    created_by: str
    created_at: str


class TokenCreated(TokenView):
    #: the secret, shown once
    token: str


class UserView(Loose):
    id: str
    name: str
    created_at: str


class UserCreated(UserView):
    password: str | None = None


class RoleView(Loose):
    name: str
    builtin: bool
    description: str
    rules: list[dict]
    created_at: str


class RoleBindingView(Loose):
    id: str
    user: str
    role: str
    scope: str
    created_at: str


class AuditView(Loose):
    id: str
    ts: str
    actor: str
    action: str
    resource: str
    outcome: Literal["allowed", "denied"]
    status: int
    detail: dict


class LoginAnswer(Loose):
    token: str
    expires_at: str
    user: str


class WhoAmI(Loose):
    user: str
    roles: list[dict]
    expires_at: str


def _list(name: str, item: type) -> type:
    return type(f"{item.__name__[:-4]}List", (Loose,), {"__annotations__": {name: list[item], "next": str | None}, "next": None})


ServerList = _list("servers", ServerView)
BastionList = _list("bastions", BastionView)
AgentList = _list("agents", AgentView)
ClusterList = _list("clusters", ClusterView)
TokenList = _list("tokens", TokenView)
UserList = _list("users", UserView)
RoleList = _list("roles", RoleView)
RoleBindingList = _list("rolebindings", RoleBindingView)
AuditList = _list("audit", AuditView)
