"""Operations: /healthz, /metrics, /api/openapi.json."""

from __future__ import annotations

import sqlite3

from flask import Blueprint, Response, jsonify

from bastion_app import get_logs, get_store, metrics
from bastion_app.db import StorageUnavailable
from bastion_app.openapi import document

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """ok only when both databases (state.db, logs.db) are the files the bastion opened and answer."""
    try:
        version = get_store().schema_version()
        get_logs().schema_version()
    except (sqlite3.Error, StorageUnavailable) as exc:
        return jsonify({"status": "error", "detail": str(exc)}), 503
    return jsonify({"status": "ok", "schema_version": version})


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(get_store()), mimetype="text/plain; version=0.0.4")


@bp.get("/api/openapi.json")
def openapi():
    return jsonify(document())
