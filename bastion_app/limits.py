"""Per-client budgets, kept by each worker in token buckets (no shared state is needed for a rough
bound): a client may spend ``burst`` at once and ``rate`` more per second.

- **Errors.** A host that keeps sending bad requests (wrong token, junk JSON, unknown machines) is
  answered 429 at once, before any parsing or database work, so that a flood from one host costs
  the bastion little and does not slow dispatch for the machines that behave. A flood from many
  hosts, each within its own budget, spends a budget shared by all of them (``error_total_*``):
  once that is spent, every host that made a mistake in the last ``ERROR_MEMORY_S`` is answered
  429 too, while hosts that made none (the machines that behave) are still served, and so is
  ``/dispatch`` (a machine must always get its boot script). Successful requests never spend
  budget.
- **New machines.** Each discovery report about a MAC the bastion does not know spends its
  source's discovery budget (``discover_rate``/``discover_burst``): a host that invents MACs is
  answered 429 (:func:`discovery_allowed`), a real machine reports once per boot.

A refused answer is also slowed down (a short tarpit, for at most ``TARPIT_SLOTS`` requests at a
time per worker, so it can never tie up the threads that serve machines) and closes the
connection: a flooding client then spends its time waiting and reconnecting instead of making the
bastion parse requests, which keeps dispatch fast for everyone else.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, current_app, request

from bastion_app.errors import error_response

MAX_CLIENTS = 4096
#: once the shared budget is spent, how long a host's last mistake counts against it
ERROR_MEMORY_S = 60.0
TARPIT_SECONDS = 0.2
TARPIT_SLOTS = 4
#: the key of the bucket that all clients share
ALL = "*"


class Buckets:
    """A token bucket per key (a client address, or ALL)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last update)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def allowed(self, key: str) -> bool:
        with self._lock:
            return self._tokens(key, time.monotonic()) > 0

    def spent_within(self, key: str, seconds: float) -> bool:
        """Whether ``key`` spent anything in the last ``seconds``."""
        with self._lock:
            hit = self._buckets.get(key)
            return hit is not None and time.monotonic() - hit[1] < seconds

    def spend(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= MAX_CLIENTS and key not in self._buckets:
                self._buckets.clear()  # bounded memory: forget everyone rather than grow
            self._buckets[key] = (self._tokens(key, now) - 1, now)

    def take(self, key: str) -> bool:
        """Spend one if there is one; False (and nothing spent) if not."""
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < 1:
                return False
            if len(self._buckets) >= MAX_CLIENTS and key not in self._buckets:
                self._buckets.clear()
            self._buckets[key] = (tokens - 1, now)
            return True


def discovery_allowed(ip: str | None) -> bool:
    """Spend one of this host's new-machine budget (False: answer 429)."""
    return current_app.extensions["lab_discovery_budget"].take(ip or "?")


def init_app(app: Flask, cfg) -> None:
    budget = Buckets(cfg.error_rate, cfg.error_burst)
    total = Buckets(cfg.error_total_rate, cfg.error_total_burst)
    app.extensions["lab_error_budget"] = budget
    app.extensions["lab_discovery_budget"] = Buckets(cfg.discover_rate, cfg.discover_burst)
    tarpit = threading.BoundedSemaphore(TARPIT_SLOTS)

    @app.before_request
    def _refuse_flooders():
        ip = request.remote_addr or "?"
        if budget.allowed(ip) and (total.allowed(ALL) or request.path == "/dispatch"
                                   or not budget.spent_within(ip, ERROR_MEMORY_S)):
            return None
        if tarpit.acquire(blocking=False):
            try:
                time.sleep(TARPIT_SECONDS)
            finally:
                tarpit.release()
        resp = error_response(429, "too many bad requests from this host",
                              f"this host's requests keep failing; slow down (at most {cfg.error_rate:g} errors/s)")
        resp.headers["Retry-After"] = "1"
        resp.headers["Connection"] = "close"
        return resp

    @app.after_request
    def _count_errors(resp):
        if 400 <= resp.status_code < 500 and resp.status_code != 429:
            budget.spend(request.remote_addr or "?")
            total.spend(ALL)
        return resp
