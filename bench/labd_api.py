#!/usr/bin/env python3
"""labd's server list over HTTP against the same queries run directly in PostgreSQL.

A real PostgreSQL 15 (tests/support.start_postgres: as root, through runuser) and a real `labd
serve` (gunicorn, 2 workers, HTTPS). 10,000 servers in 10 bastions' scopes (bastion b<i> in cloud
lab<i // 5 + 1>, environment env<i % 5>, 1,000 servers each, half of them labelled tier=web). Two
lists, each timed --runs times:

- whole:    every server, in pages of 1,000 (GET /api/v1/servers?limit=1000 and its `next`s)
- filtered: one bastion's web servers (?cloud=..&environment=..&bastion=..&label=tier=web)

over HTTP (as the admin, TLS, keep-alive, answers decoded) and directly through psycopg (one
connection, the very SQL labd runs, from labd.api.list_query: the same rows, each rendered as its
JSON text by the database). Prints p50/p95 of each and the ratio of the
p95s (target <= 2x).

    python bench/labd_api.py [--servers 10000] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labd import rbac  # noqa: E402
from labd.api import KINDS, list_query  # noqa: E402
from labd.schemas import ServerQuery  # noqa: E402
from tests.support import start_labd, start_postgres  # noqa: E402

ADMIN = rbac.grants([(rbac.BUILTIN_ROLES["admin"]["rules"], "*")])
PAGE = 1000


def populate(url: str, n: int) -> None:
    per = n // 10
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY servers (mac, state, hostname, role, os, bastion, cloud, environment, labels, hardware) FROM STDIN") as cp:
            for i in range(n):
                b = i // per
                cp.write_row((f"52:54:{(i >> 24) & 0xff:02x}:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}",
                              "installed", f"node{i:05d}", "worker", "debian-12", f"b{b}", f"lab{b // 5 + 1}", f"env{b % 5}",
                              Jsonb({"tier": "web" if i % 2 else "db", "rack": f"r{i % 40}"}),
                              Jsonb({"cpu": {"model": "QEMU Virtual CPU", "cores": 4}, "memory_mb": 8192,
                                     "firmware": "uefi"})))
        conn.execute("ANALYZE servers")


def direct(conn: psycopg.Connection, params: dict) -> int:
    """The very queries labd runs for one list as the admin (labd.api.list_query), page by page."""
    rows_seen, cursor = 0, None
    while True:
        q = ServerQuery.model_validate({**params, "label": [params["label"]] if "label" in params else [],
                                        "limit": PAGE, "cursor": cursor})
        with conn.transaction():
            rows = conn.execute(*list_query(KINDS["servers"], ADMIN, q)).fetchall()
        page = rows[:PAGE]
        rows_seen += len(page)
        if len(rows) <= PAGE:
            return rows_seen
        cursor = page[-1]["k"]


def http(session, url: str, params: dict) -> int:
    rows_seen, cursor = 0, None
    while True:
        r = session.get(url + "/api/v1/servers", params={**params, "limit": PAGE, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        body = r.json()
        rows_seen += len(body["servers"])
        cursor = body["next"]
        if cursor is None:
            return rows_seen


def timed(fns, runs: int) -> list[tuple[list[float], int]]:
    """Run each function ``runs`` times, interleaved (a, b, a, b, ...) so that both meet the same
    load on a shared machine; (times in ms, rows) of each."""
    out = [([], 0) for _ in fns]
    for fn in fns:
        fn()  # warm
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            n = fn()
            out[i] = (out[i][0] + [(time.perf_counter() - t) * 1000], n)
    return out


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    pg = start_postgres()
    labd = None
    try:
        pg.sql("CREATE DATABASE bench")
        url = pg.url("bench")
        with tempfile.TemporaryDirectory(prefix="labd-bench-") as tmp:
            labd = start_labd(Path(tmp) / "data", url)
            populate(url, args.servers)
            session = labd.session(labd.login())
            b = 3
            flt_http = {"cloud": f"lab{b // 5 + 1}", "environment": f"env{b % 5}", "bastion": f"b{b}", "label": "tier=web"}
            with psycopg.connect(url, row_factory=dict_row) as conn:
                conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE  # as labd's pool
                conn.execute("SET TIME ZONE 'UTC'")
                conn.commit()
                results = {}
                for name, h in (("whole", {}), ("filtered", flt_http)):
                    (t_http, n_http), (t_sql, n_sql) = timed(
                        [lambda h=h: http(session, labd.url, h), lambda h=h: direct(conn, h)], args.runs)
                    assert n_http == n_sql, (name, n_http, n_sql)
                    results[name] = (t_http, t_sql, n_http)
            labd.stop()
    finally:
        if labd:
            labd.stop()
        pg.stop()
    print(f"labd server list: {args.servers} servers in 10 bastions' scopes, {args.runs} runs each, pages of {PAGE}")
    ok = True
    for name, (t_http, t_sql, n) in results.items():
        ratio = p(t_http, 95) / p(t_sql, 95)
        ok &= ratio <= 2.0
        print(f"  {name:8} ({n:5d} rows): HTTP p50={p(t_http, 50):7.1f} ms p95={p(t_http, 95):7.1f} ms | "
              f"psycopg p50={p(t_sql, 50):7.1f} ms p95={p(t_sql, 95):7.1f} ms | ratio p95 {ratio:.2f}x (target <= 2x)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
