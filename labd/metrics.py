"""labd's Prometheus metrics (per-worker values summed through PROMETHEUS_MULTIPROC_DIR, which
`labd serve` sets); requests are counted and timed by the bastion's own hooks."""

from __future__ import annotations

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram

from bastion_app import metrics as bastion_metrics

REQUESTS = Counter("labd_requests_total", "HTTP requests", ["method", "endpoint", "status"])
LATENCY = Histogram("labd_request_seconds", "HTTP request latency", ["endpoint"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
RETRIES = Counter("labd_transaction_retries_total", "Transactions run again after a serialization failure (40001)")
DENIED = Counter("labd_denied_total", "Requests denied (401 and 403)", ["status"])


def init_app(app: Flask) -> None:
    bastion_metrics.init_app(app, REQUESTS, LATENCY)

    @app.get("/metrics")
    def metrics():
        return Response(bastion_metrics.process_exposition(), mimetype=CONTENT_TYPE_LATEST)
