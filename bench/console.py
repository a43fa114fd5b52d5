#!/usr/bin/env python3
"""The console's machines page with 1,000 machines against GET /api/machines of the same machines.

Against one `lab-bastion serve` (nginx in front of gunicorn): 1,000 machines report the hardware of
a real UEFI machine (tests/support.UEFI_HW), half of them have an install queued. A logged-in
console session then asks, in turn, for the machines page as it opens (the first page, 100
machines, with the counts by state), the page with all 1,000 machines (?per=1000), the live
fragment the page polls when nothing changed (304), and GET /api/machines?limit=1000 (the
baseline: all 1,000 in one answer, as labctl reads them). Prints each one's response time (p50,
p95, measured by the client on loopback, so it is the server's time plus a loopback round trip),
the ratio of the pages' p95 to the API's (target <= 2x) and the page weight in kB with its style
sheet and script (no images; target < 100 kB).

    python bench/console.py [--machines 1000] [--rounds 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.boot_storm import start_server  # noqa: E402
from tests.support import UEFI_HW, console_login, session_from, synthetic_mac  # noqa: E402


def load(server, n: int) -> None:
    def one(i: int) -> None:
        mac = synthetic_mac(i, "52:54:07")
        # each machine reports from its own address (the bastion limits new machines per host)
        r = session_from(f"127.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}").post(
            server.url + "/api/discover", json={"mac": mac, "hardware": UEFI_HW}, timeout=30)
        assert r.ok, r.text
        if i % 2:
            r = requests.post(server.url + "/api/install", headers=server.headers, timeout=30,
                              json={"mac": mac, "hostname": f"node{i:04d}", "role": "worker", "os": "debian-12"})
            assert r.status_code == 202, r.text

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(one, range(n)))


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-console-") as d:
        server = start_server(Path(d) / "data", workers=args.workers)
        try:
            load(server, args.machines)
            console, api = console_login(server.url, server.token), server.session()
            etag = console.get(server.url + "/console/machines/live", timeout=30).headers["ETag"]
            kinds = {
                "page": lambda: console.get(server.url + "/console/machines", timeout=30),
                "page_all": lambda: console.get(server.url + f"/console/machines?per={args.machines}", timeout=30),
                "live_304": lambda: console.get(server.url + "/console/machines/live", headers={"If-None-Match": etag}, timeout=30),
                "api": lambda: api.get(server.url + "/api/machines", params={"limit": args.machines}, timeout=30),
            }
            times: dict[str, list[float]] = {k: [] for k in kinds}
            sizes: dict[str, int] = {}
            for _ in range(3):  # warm up every worker
                for get in kinds.values():
                    get()
            for _ in range(args.rounds):
                for kind, get in kinds.items():
                    t0 = time.perf_counter()
                    r = get()
                    times[kind].append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == (304 if kind == "live_304" else 200), (kind, r.status_code)
                    sizes[kind] = len(r.content)
            rows = console.get(server.url + f"/console/machines?per={args.machines}", timeout=30).text.count("<tr data-mac")
            assets = sum(len(console.get(server.url + f"/console/static/{f}", timeout=30).content)
                         for f in ("console.css", "console.js"))
        finally:
            server.stop()
    api95 = pct(times["api"], 95)
    print(f"console machines page, {args.machines} machines (half queued), {args.rounds} rounds, {args.workers} gunicorn workers")
    for kind, label in (("api", "GET /api/machines?limit=N (baseline)"), ("page", "GET /console/machines (100 a page)"),
                        ("page_all", f"GET /console/machines?per={args.machines}"), ("live_304", "live fragment, unchanged (304)")):
        print(f"  {label:40s} p50={pct(times[kind], 50):7.1f} ms  p95={pct(times[kind], 95):7.1f} ms  "
              f"{sizes[kind] / 1024:7.1f} kB")
    ratio_page, ratio_all = pct(times["page"], 95) / api95, pct(times["page_all"], 95) / api95
    weight, weight_all = (sizes["page"] + assets) / 1024, (sizes["page_all"] + assets) / 1024
    print(f"  p95 ratio page/api: {ratio_page:.2f}x, all-{args.machines} page/api: {ratio_all:.2f}x (target <= 2x)")
    print(f"  page weight with css+js, no images: {weight:.1f} kB (target < 100 kB); all {rows} rows on one page: "
          f"{weight_all:.1f} kB")
    ok = ratio_page <= 2.0 and ratio_all <= 2.0 and weight < 100 and rows == args.machines
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
