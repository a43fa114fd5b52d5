"""labd's Prometheus metrics (per-worker registries summed through PROMETHEUS_MULTIPROC_DIR,
which `labd serve` sets, as the bastion's supervisor does)."""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REQUESTS = Counter("labd_requests_total", "HTTP requests", ["method", "endpoint", "status"])
LATENCY = Histogram("labd_request_seconds", "HTTP request latency", ["endpoint"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
RETRIES = Counter("labd_transaction_retries_total", "Transactions run again after a serialization failure (40001)")
DENIED = Counter("labd_denied_total", "Requests denied (401 and 403)", ["status"])


def exposition() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def init_app(app: Flask) -> None:
    @app.before_request
    def _start():
        g.metrics_t0 = time.perf_counter()

    @app.after_request
    def _count(resp):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, endpoint, str(resp.status_code)).inc()
        LATENCY.labels(endpoint).observe(time.perf_counter() - g.get("metrics_t0", time.perf_counter()))
        return resp

    @app.get("/metrics")
    def metrics():
        return Response(exposition(), mimetype=CONTENT_TYPE_LATEST)
