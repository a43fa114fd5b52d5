"""The OpenAPI document: paths from openapi.yaml, schemas generated from labcore.schemas."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml
from pydantic.json_schema import models_json_schema

from labcore import domain, schemas, validate
from labcore.lifecycle import STORED_STATES

SPEC = Path(__file__).with_name("openapi.yaml")

MODELS = [
    schemas.DiscoverRequest, schemas.InstallRequest, schemas.ReprovisionRequest, schemas.ProgressRequest, schemas.InstallIdentity,
    schemas.LogRequest, schemas.DebugRequest, schemas.ReasonRequest,
    schemas.ErrorBody, schemas.MachineView, schemas.MachineList, schemas.MachineDetail, schemas.EventView,
    schemas.EventList, schemas.StateReply,
    schemas.BmcRequest, schemas.BmcView, schemas.PowerRequest, schemas.PowerReply,
    schemas.PowerBatchRequest,
]


@functools.cache
def document() -> dict:
    doc = yaml.safe_load(SPEC.read_text())
    _, top = models_json_schema([(m, "validation") for m in MODELS], ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(top.get("$defs", {}))
    # every `mac` and `token` parameter, in a path or a query, is described by the validator's own pattern
    # any operation may answer 429 to a host that keeps sending bad requests (bastion_app.limits)
    doc["components"].setdefault("responses", {})["TooManyBadRequests"] = {
        "description": "this host keeps sending bad requests; retry after Retry-After seconds",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for ops in doc["paths"].values():
        for op in ops.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"].setdefault("429", {"$ref": "#/components/responses/TooManyBadRequests"})
    patterns = {"mac": validate.MAC_PATTERN, "token": validate.TOKEN_PATTERN}
    # and every state, role and os filter by the names the lifecycle and the domain's tables define
    enums = {"state": [s.value for s in STORED_STATES], "role": list(domain.ROLE_NAMES), "os": list(domain.OS_NAMES)}
    for param in _parameters(doc):
        if param.get("name") in patterns:
            param["schema"] = {"type": "string", "pattern": patterns[param["name"]]}
        elif param.get("name") in enums:
            param["schema"] = {"type": "string", "enum": enums[param["name"]]}
    return doc


def _parameters(doc: dict):
    yield from doc.get("components", {}).get("parameters", {}).values()
    for ops in doc["paths"].values():
        for op in ops.values():
            if isinstance(op, dict):
                yield from (p for p in op.get("parameters", []) if "name" in p)
