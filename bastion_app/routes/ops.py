"""Operations: /healthz, /metrics, /api/openapi.json."""

from __future__ import annotations

import sqlite3

from flask import Blueprint, Response, jsonify

from bastion_app import get_store, metrics
from bastion_app.openapi import document

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    try:
        version = get_store().schema_version()
    except sqlite3.Error as exc:
        return jsonify({"status": "error", "detail": str(exc)}), 503
    return jsonify({"status": "ok", "schema_version": version})


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(get_store()), mimetype="text/plain; version=0.0.4")


@bp.get("/api/openapi.json")
def openapi():
    return jsonify(document())
