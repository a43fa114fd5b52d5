"""The operator token (data dir, mode 0600) and the bearer check for operator endpoints."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

from flask import current_app, request

from bastion_app.errors import ApiError
from labcore import private, validate


def ensure_token(path: Path) -> str:
    """Read the operator token, creating it (mode 0600, atomically) on first start."""
    token = private.create_once(path, lambda: validate.new_token(32) + "\n").decode().strip()
    if len(token) < 16:
        raise RuntimeError(f"{path}: operator token is missing or too short; delete the file to make a new one")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return secrets.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def operator_required(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not bearer_ok(request.headers.get("Authorization"), current_app.config["LAB_TOKEN"]):
            raise ApiError(401, "unauthorized", "send the operator token: Authorization: Bearer <lab-bastion token>")
        return view(*args, **kwargs)

    wrapper.operator_only = True  # type: ignore[attr-defined]
    return wrapper


def actor() -> str:
    return f"operator@{request.remote_addr or 'local'}"
