"""Validation of a state.json document (the seed's shape) before it is imported."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from labcore import schemas, validate


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hardware: schemas.Hardware = Field(default_factory=schemas.Hardware)
    ip: str | None = None
    first_seen: float | None = None


class _Install(_Entry):
    hostname: schemas.Hostname
    role: schemas.Role
    os: schemas.OsName
    disk: schemas.Disk = ""
    ssh_keys: list[schemas.SshKey] = Field(default_factory=list)


class _Queued(_Install):
    status: Literal["install_queued", "installing", "failed"] = "install_queued"
    token: schemas.Token | None = None
    stage: str | None = None
    percent: int | None = Field(None, ge=0, le=100)
    failure: str | None = None


class _Installed(_Install):
    installed_at: float | None = None


class _Debug(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mode: schemas.DebugMode = "rescue"


class StateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    discovered: dict[str, _Entry] = Field(default_factory=dict)
    install_queue: dict[str, _Queued] = Field(default_factory=dict)
    installed: dict[str, _Installed] = Field(default_factory=dict)
    debug: dict[str, _Debug] = Field(default_factory=dict)


def validate_state_doc(raw: Any) -> dict[str, Any]:
    doc = StateDoc.model_validate(raw)
    out: dict[str, Any] = {}
    for section in ("discovered", "install_queue", "installed", "debug"):
        entries = getattr(doc, section)
        normalised = {}
        for mac, entry in entries.items():
            key = validate.mac(mac, f"{section}.{mac}")
            if key in normalised:
                raise ValueError(f"{section}: {mac} appears twice")
            normalised[key] = entry.model_dump()
        out[section] = normalised
    return out
