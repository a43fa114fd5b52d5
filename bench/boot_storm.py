#!/usr/bin/env python3
"""Boot storm: 1,000 simulated machines, 200 at a time, each doing GET /dispatch (the install
script, which carries its install token) then 5 POST /api/progress, against a real
`lab-bastion serve` (gunicorn, 4 workers). Target: 0 errors. Prints requests/s and p50/p99.

Baseline named in the output: GET /healthz (no store work) under the same concurrency, so the
ratio shows what the state work costs on top of HTTP.

`run_storm()` and `start_server()` are reused by bench/follow.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import SMALL_HW, TOKEN_RE, Bastion, session_from, start_bastion, synthetic_mac  # noqa: E402

STAGES = [("partitioning", 10), ("packages", 40), ("packages", 70), ("post-install", 90), ("post-install", 95)]


def mac(i: int) -> str:
    return synthetic_mac(i, "52:54:03")


def start_server(data_dir: Path, workers: int = 4, extra: list[str] | None = None) -> Bastion:
    """A real `lab-bastion serve --no-dnsmasq` on a free loopback port (the tests' own starter)."""
    return start_bastion(data_dir, *(extra or []), workers=workers, timeout=60)


def queue_machines(server: Bastion, macs: list[str], concurrency: int = 16) -> None:
    def one(i_m):
        i, m = i_m
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {server.token}"
        # each machine reports from its own address (the bastion limits new machines per host)
        assert session_from(f"127.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}").post(
            server.url + "/api/discover", json={"mac": m, "hardware": SMALL_HW}).ok
        r = s.post(server.url + "/api/install", json={"mac": m, "hostname": f"storm{i}", "role": "worker", "os": "fedora-43"})
        assert r.status_code == 202, r.text

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, enumerate(macs)))


def all_machines(server: Bastion, **filters) -> list[dict]:
    """Every machine, following the pages of GET /api/machines."""
    out, cursor = [], None
    while True:
        doc = requests.get(server.url + "/api/machines", headers={"Authorization": f"Bearer {server.token}"}, timeout=60,
                           params={**filters, "limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
        out += doc["machines"]
        cursor = doc.get("next")
        if not cursor:
            return out


@dataclass
class StormResult:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"dispatch": [], "progress": []})
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def pct(self, kind: str, p: float) -> float:
        xs = sorted(self.latencies[kind])
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_storm(url: str, macs: list[str], concurrency: int, progress_posts: int = 5) -> StormResult:
    """Each simulated machine: one connection; GET /dispatch, then progress posts with its token."""
    res = StormResult()
    lock = threading.Lock()

    def machine(m: str):
        lat: dict[str, list[float]] = {"dispatch": [], "progress": []}
        errs = []
        n = 0
        with requests.Session() as s:
            t = time.perf_counter()
            try:
                r = s.get(url + "/dispatch", params={"mac": m}, timeout=30)
                lat["dispatch"].append(time.perf_counter() - t)
                n += 1
                tok = TOKEN_RE.search(r.text)
                if r.status_code != 200 or not tok:
                    errs.append(f"dispatch {m}: {r.status_code}")
                else:
                    for stage, pct in STAGES[:progress_posts]:
                        t = time.perf_counter()
                        r = s.post(url + "/api/progress", json={"mac": m, "token": tok.group(1), "stage": stage, "percent": pct,
                                                                "message": "storm"}, timeout=30)
                        lat["progress"].append(time.perf_counter() - t)
                        n += 1
                        if r.status_code != 200:
                            errs.append(f"progress {m}: {r.status_code} {r.text[:100]}")
            except requests.RequestException as exc:
                errs.append(f"{m}: {exc}")
        with lock:
            for k in lat:
                res.latencies[k].extend(lat[k])
            res.errors.extend(errs)
            res.requests += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(machine, macs))
    res.seconds = time.perf_counter() - t0
    return res


def run_health_baseline(url: str, count: int, concurrency: int) -> StormResult:
    res = StormResult(latencies={"dispatch": [], "progress": []})
    lock = threading.Lock()

    def one(_):
        with requests.Session() as s:
            t = time.perf_counter()
            r = s.get(url + "/healthz", timeout=30)
            with lock:
                res.latencies["dispatch"].append(time.perf_counter() - t)
                res.requests += 1
                if r.status_code != 200:
                    res.errors.append(str(r.status_code))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(count)))
    res.seconds = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description="boot storm against lab-bastion serve")
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as d:
        server = start_server(Path(d) / "data", workers=args.workers)
        try:
            macs = [mac(i) for i in range(args.machines)]
            queue_machines(server, macs)
            base = run_health_baseline(server.url, args.machines, args.concurrency)
            res = run_storm(server.url, macs, args.concurrency)
            states = all_machines(server, state="installing")
        finally:
            server.stop()
    print(f"boot storm: {args.machines} machines, {args.concurrency} at a time, {args.workers} gunicorn workers")
    print(f"  requests: {res.requests} in {res.seconds:.1f} s = {res.rps:.0f} req/s; errors: {len(res.errors)}")
    for kind in ("dispatch", "progress"):
        xs = res.latencies[kind]
        print(f"  {kind:9s} n={len(xs):5d} p50={res.pct(kind, 50):7.1f} ms  p99={res.pct(kind, 99):7.1f} ms  mean={statistics.mean(xs) * 1000:7.1f} ms")
    print(f"  baseline GET /healthz (same concurrency, no store work): {base.rps:.0f} req/s, p50={base.pct('dispatch', 50):.1f} ms p99={base.pct('dispatch', 99):.1f} ms")
    print(f"  ratio dispatch p50 / healthz p50: {res.pct('dispatch', 50) / base.pct('dispatch', 50):.2f}x")
    print(f"  machines installing at the end: {len(states)} (expected {args.machines})")
    for e in res.errors[:10]:
        print("  error:", e)
    ok = not res.errors and len(states) == args.machines
    print("PASS: 0 errors" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
