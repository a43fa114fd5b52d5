"""Prometheus metrics: requests, machines by state (read from the store at scrape time), install
durations. Under gunicorn the supervisor sets PROMETHEUS_MULTIPROC_DIR so every worker's counters
are summed."""

from __future__ import annotations

import os
import time

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from labcore.lifecycle import STORED_STATES

REQUESTS = Counter("lab_bastion_requests_total", "HTTP requests", ["method", "endpoint", "status"])
LATENCY = Histogram(
    "lab_bastion_request_seconds", "HTTP request latency", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INSTALL_SECONDS = Histogram(
    "lab_bastion_install_duration_seconds", "Time from install start to complete or failure", ["os", "result"],
    buckets=(60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200),
)


class MachineCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        counts = self.store.count_by_state()
        g_ = GaugeMetricFamily("lab_bastion_machines", "Machines by lifecycle state", labels=["state"])
        for s in STORED_STATES:
            g_.add_metric([s.value], counts.get(s.value, 0))
        yield g_
        yield GaugeMetricFamily("lab_bastion_installs_stalled", "Installs marked stalled (no progress in time)",
                                value=self.store.count_stalled())


def observe_install(machine: dict, result: str) -> None:
    if machine.get("install_started_at"):
        INSTALL_SECONDS.labels(machine.get("os") or "unknown", result).observe(max(0.0, time.time() - machine["install_started_at"]))


def process_exposition() -> bytes:
    """This process' metrics, or every gunicorn worker's summed when PROMETHEUS_MULTIPROC_DIR is set
    (labd uses it too)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def exposition(store) -> bytes:
    process = process_exposition()
    machines = CollectorRegistry(auto_describe=False)
    machines.register(MachineCollector(store))
    return process + generate_latest(machines)


def init_app(app: Flask, requests: Counter = REQUESTS, latency: Histogram = LATENCY) -> None:
    """Count every request (method, route, status) and time it (labd passes its own metrics)."""
    @app.before_request
    def _start():
        g._lab_t0 = time.perf_counter()

    @app.after_request
    def _count(resp):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        requests.labels(request.method, endpoint, str(resp.status_code)).inc()
        if hasattr(g, "_lab_t0"):
            latency.labels(endpoint).observe(time.perf_counter() - g._lab_t0)
        return resp
