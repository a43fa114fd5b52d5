"""labd's errors beyond the bastion's (bastion_app.errors gives the JSON shape and the rest)."""

from __future__ import annotations

import logging

import psycopg
import psycopg_pool
from flask import Flask

from bastion_app.errors import error_response

log = logging.getLogger("labd")


def register(app: Flask) -> None:
    @app.errorhandler(psycopg.errors.UniqueViolation)
    def _conflict(exc):
        return error_response(409, "already exists", (exc.diag.constraint_name or "").replace("_key", ""))

    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(psycopg_pool.PoolTimeout)
    def _unavailable(exc):
        log.error("database unavailable: %s", exc)
        resp = error_response(503, "database unavailable", "nothing was changed; retry later")
        resp.headers["Retry-After"] = "5"
        return resp
