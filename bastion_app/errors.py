"""JSON errors: {"error": "...", "detail": ...} with the right 4xx. A 5xx is a bug."""

from __future__ import annotations

import logging
import sqlite3

import pydantic
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from bastion_app.store import StoreError
from labcore.lifecycle import IllegalTransition
from labcore.validate import ValidationError

log = logging.getLogger("bastion_app")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail=None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail=None):
    body = {"error": error}
    if detail is not None:
        body["detail"] = detail
    resp = jsonify(body)
    resp.status_code = status
    return resp


def pydantic_detail(exc: pydantic.ValidationError) -> list[dict[str, str]]:
    out = []
    for e in exc.errors(include_url=False, include_context=False, include_input=False):
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append({"field": ".".join(str(p) for p in e["loc"]) or "body", "message": msg})
    return out


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail)

    @app.errorhandler(pydantic.ValidationError)
    def _pyd(exc: pydantic.ValidationError):
        return error_response(422, "invalid request", pydantic_detail(exc))

    @app.errorhandler(ValidationError)
    def _val(exc: ValidationError):
        return error_response(422, "invalid request", [{"field": exc.field, "message": exc.message}])

    @app.errorhandler(IllegalTransition)
    def _illegal(exc: IllegalTransition):
        return error_response(409, str(exc), {"action": exc.action.value, "state": exc.current.value})

    @app.errorhandler(StoreError)
    def _store(exc: StoreError):
        if exc.status == 503:
            return _storage(exc)
        return error_response(exc.status, str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        resp = error_response(exc.code or 500, (exc.name or "error").lower(), exc.description)
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "retry-after", "www-authenticate"):
                resp.headers[name] = value
        return resp

    @app.errorhandler(sqlite3.OperationalError)
    def _storage(exc: Exception):
        # disk full, read-only data directory, I/O error: the change was rolled back, nothing is
        # half-written; say so, and let the client retry when the operator has fixed the disk.
        msg = str(exc)
        if not msg.startswith("storage unavailable"):
            msg = f"storage unavailable: {msg}"
        log.error("%s", msg)
        resp = error_response(503, msg, "nothing was changed; retry when the data directory is writable and has space")
        resp.headers["Retry-After"] = "5"
        return resp

    @app.errorhandler(Exception)
    def _bug(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error", "this is a bug in the bastion; see its log")
