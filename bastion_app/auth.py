"""The operator token (data dir, mode 0600) and the bearer check for operator endpoints."""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

from flask import current_app, request

from bastion_app.errors import ApiError
from labcore import validate


def ensure_token(path: Path) -> str:
    """Read the operator token, creating it (mode 0600, atomically) on first start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(validate.new_token(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)
    token = path.read_text().strip()
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
