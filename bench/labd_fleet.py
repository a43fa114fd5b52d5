#!/usr/bin/env python3
"""A fleet of bastions joined to labd: replication, routed commands, catch-up.

A real PostgreSQL 15 (tests/support.start_postgres), a real `labd serve` (API + hub) and
--bastions real `lab-bastion serve` (1 worker each), each joined with `lab-bastion join` and
holding --machines discovered machines (written through the bastion's store before it serves,
so the first figure is the initial replication of the whole fleet).

1. initial replication: the time until labd has every bastion's machines and events;
2. routed install: --installs installs sent through labd (POST /api/v1/servers/<mac>/install:
   labd -> hub -> the bastion's link -> the bastion's API, and the answer back) against the same
   installs sent straight to the bastions' APIs, alternating, in the same run; p50/p99 of each and
   the ratio of the p99s (target <= 2x);
3. catch-up: labd killed (-9), --events events made on the bastions meanwhile (installs queued
   and cancelled through their own APIs: the bastions keep working), labd started again; the time
   from its start until every (bastion, event id) is in labd (each exactly once, checked).

    python bench/labd_fleet.py [--bastions 10] [--machines 1000] [--installs 200] [--events 10000]
    python bench/labd_fleet.py --bastions 3 --machines 300      # the scale of the issue's test
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bastion_app.store import Store  # noqa: E402
from labcore import bastion_config  # noqa: E402
from tests.support import (  # noqa: E402
    UEFI_HW,
    bastion_join,
    join_token,
    start_bastion,
    start_labd,
    start_postgres,
    wait_for,
)


def mac(b: int, i: int) -> str:
    return f"52:54:{b:02x}:01:{i // 256:02x}:{i % 256:02x}"


def p(values: list[float], q: int) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] * 1000


def events_on(b) -> int:
    with sqlite3.connect(b.data_dir / "state.db") as c:
        return c.execute("SELECT count(*) FROM events").fetchone()[0]


def caught_up(url: str, fleet: dict) -> bool:
    with psycopg.connect(url) as c:
        have = dict(c.execute("SELECT bastion, count(*) FROM bastion_events GROUP BY bastion").fetchall())
    return all(have.get(name, 0) == events_on(b) for name, b in fleet.items())


def install_body(name: str) -> dict:
    return {"hostname": name, "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bastions", type=int, default=10)
    ap.add_argument("--machines", type=int, default=1000, help="per bastion")
    ap.add_argument("--installs", type=int, default=200, help="routed and direct, each")
    ap.add_argument("--events", type=int, default=10_000, help="made while labd is down")
    args = ap.parse_args()
    pg = start_postgres()
    labd, fleet = None, {}
    try:
        pg.sql("CREATE DATABASE bench")
        url = pg.url("bench")
        with tempfile.TemporaryDirectory(prefix="labd-fleet-") as tmp:
            labd = start_labd(Path(tmp) / "labd", url)
            admin = labd.session(labd.login())
            for i in range(1, args.bastions + 1):
                d = Path(tmp) / f"b{i}"
                r = bastion_join(labd.url, join_token(labd, admin), d, f"b{i}")
                assert r.returncode == 0, r.stderr
                store = Store.from_config(bastion_config.load(d))
                store.migrate()
                for j in range(args.machines):
                    store.discover(mac(i, j), UEFI_HW, ip=f"10.{i}.{j // 250}.{j % 250 + 1}")
                store.close()
            t0 = time.monotonic()
            for i in range(1, args.bastions + 1):
                fleet[f"b{i}"] = start_bastion(Path(tmp) / f"b{i}", workers=1, timeout=120)
            total = args.bastions * args.machines
            wait_for(lambda: caught_up(url, fleet), timeout=1800, interval=0.5, what="initial replication")
            t_initial = time.monotonic() - t0
            with psycopg.connect(url) as c:
                n_servers = c.execute("SELECT count(*) FROM servers").fetchone()[0]
            assert n_servers == total, (n_servers, total)

            # routed against direct, alternating, on different machines of the same bastions
            routed, direct = [], []
            http = {name: b.session() for name, b in fleet.items()}
            names = list(fleet)
            for k in range(args.installs):
                bi = k % args.bastions + 1
                name = names[bi - 1]
                m_routed, m_direct = mac(bi, 2 * (k // args.bastions)), mac(bi, 2 * (k // args.bastions) + 1)
                t = time.perf_counter()
                r = admin.post(labd.url + f"/api/v1/servers/{m_routed}/install", json=install_body(f"r{k}"))
                routed.append(time.perf_counter() - t)
                assert r.status_code == 202, r.text
                t = time.perf_counter()
                r = http[name].post(fleet[name].url + "/api/install", json={"mac": m_direct, **install_body(f"d{k}")})
                direct.append(time.perf_counter() - t)
                assert r.status_code == 202, r.text

            # catch-up after labd was down while the bastions made --events events
            wait_for(lambda: caught_up(url, fleet), timeout=600, interval=0.5, what="replication before the stop")
            labd.kill()
            per = args.events // args.bastions // 2  # an install queued and cancelled: two events

            def churn(i: int) -> None:
                b, s = fleet[f"b{i}"], http[f"b{i}"]
                for j in range(per):
                    m = mac(i, args.machines - 1 - (j % (args.machines // 2)))
                    r = s.post(b.url + "/api/install", json={"mac": m, **install_body(f"c{i}-{j}")})
                    assert r.status_code == 202, r.text
                    r = s.post(b.url + f"/api/machines/{m}/cancel", json={"reason": "bench"})
                    assert r.status_code == 200, r.text
            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.bastions) as ex:
                list(ex.map(churn, range(1, args.bastions + 1)))
            t_churn = time.monotonic() - t
            made = 2 * per * args.bastions
            t = time.monotonic()
            labd.start(timeout=120)
            wait_for(lambda: caught_up(url, fleet), timeout=1800, interval=0.2, what="catch-up")
            t_catchup = time.monotonic() - t
            with psycopg.connect(url) as c:
                dup = c.execute("SELECT count(*) FROM (SELECT 1 FROM bastion_events GROUP BY bastion, event_id "
                                "HAVING count(*) > 1) d").fetchone()[0]
            assert dup == 0
            bs = admin.get(labd.url + "/api/v1/bastions", params={"limit": 500}).json()["bastions"]
            assert all(b["lag"] == 0 and b["machines"] == args.machines for b in bs), bs
    finally:
        for b in fleet.values():
            b.stop()
        if labd:
            labd.stop()
        pg.stop()
    ratio = p(routed, 99) / p(direct, 99)
    print(f"labd fleet: {args.bastions} bastions x {args.machines} machines ({total} servers) joined to one labd")
    print(f"  initial replication of {total} machines and their events: {t_initial:.1f} s")
    print(f"  install, {args.installs} each: routed through labd p50={p(routed, 50):.1f} ms p99={p(routed, 99):.1f} ms | "
          f"straight to the bastion p50={p(direct, 50):.1f} ms p99={p(direct, 99):.1f} ms | ratio p99 {ratio:.2f}x (target <= 2x)")
    print(f"  catch-up: {made} events made on the bastions in {t_churn:.1f} s with labd down; labd back: all in labd, "
          f"each once, {t_catchup:.1f} s after its start ({made / t_catchup:.0f} events/s)")
    print(f"  (mean routed {statistics.mean(routed) * 1000:.1f} ms, direct {statistics.mean(direct) * 1000:.1f} ms)")
    ok = ratio <= 2.0
    print("PASS" if ok else "FAIL (routed p99 above 2x direct)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
