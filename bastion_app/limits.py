"""A per-client budget for errors: a host that keeps sending bad requests (wrong token, junk JSON,
unknown machines) is answered 429 at once, before any parsing or database work, so that a flood
from one host costs the bastion little and does not slow dispatch for the machines that behave.

Each worker keeps its own token buckets (no shared state is needed for a rough bound): a client
may make ``burst`` errors at once and ``rate`` more per second; a request that the budget refuses
costs nothing further. Successful requests never spend budget.

A refused answer is also slowed down (a short tarpit, for at most ``TARPIT_SLOTS`` requests at a
time per worker, so it can never tie up the threads that serve machines) and closes the
connection: a flooding client then spends its time waiting and reconnecting instead of making the
bastion parse requests, which keeps dispatch fast for everyone else.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, request

from bastion_app.errors import error_response

MAX_CLIENTS = 4096
TARPIT_SECONDS = 0.2
TARPIT_SLOTS = 4


class ErrorBudget:
    def __init__(self, rate: float = 20.0, burst: float = 100.0):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, last update)
        self._lock = threading.Lock()

    def _tokens(self, ip: str, now: float) -> float:
        tokens, last = self._buckets.get(ip, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def allowed(self, ip: str) -> bool:
        with self._lock:
            return self._tokens(ip, time.monotonic()) > 0

    def spend(self, ip: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= MAX_CLIENTS and ip not in self._buckets:
                self._buckets.clear()  # bounded memory: forget everyone rather than grow
            self._buckets[ip] = (self._tokens(ip, now) - 1, now)


def init_app(app: Flask, rate: float, burst: float) -> None:
    budget = ErrorBudget(rate, burst)
    app.extensions["lab_error_budget"] = budget
    tarpit = threading.BoundedSemaphore(TARPIT_SLOTS)

    @app.before_request
    def _refuse_flooders():
        ip = request.remote_addr or "?"
        if not budget.allowed(ip):
            if tarpit.acquire(blocking=False):
                try:
                    time.sleep(TARPIT_SECONDS)
                finally:
                    tarpit.release()
            resp = error_response(429, "too many bad requests from this host",
                                  f"this host's requests keep failing; slow down (at most {rate:g} errors/s)")
            resp.headers["Retry-After"] = "1"
            resp.headers["Connection"] = "close"
            return resp
        return None

    @app.after_request
    def _count_errors(resp):
        if 400 <= resp.status_code < 500 and resp.status_code != 429:
            budget.spend(request.remote_addr or "?")
        return resp
