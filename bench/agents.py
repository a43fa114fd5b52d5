#!/usr/bin/env python3
"""1,000 lab-agents against one labd: heartbeat writes, exec round trip, hub memory per agent.

One real `labd serve` (gunicorn API + the hub, TLS and mTLS) on a real PostgreSQL. The agents are
simulated in this one process with the real client code (lab_agent.daemon.Agent on
labcore.link.Link: one mutually authenticated WebSocket each, real heartbeats from /proc, real
exec of `true`). All are enrolled through POST /api/v1/enroll (one reusable token; approved in
the database, the setup is not what is measured).

1. One agent connected (a real `lab-agent run` process): exec round trip (POST /agents/<host>/exec -> GET /commands/<id> says done)
   `--execs` times: the baseline p99.
2. All agents connected (that one and the others simulated here): the same round trip (target: p99 <= 2x the baseline); the hub's resident
   memory before and after, per agent; rows of `agents` updated per second over a window against
   heartbeats sent per second (batched: one statement per hub beat, not one write per heartbeat).

    python bench/agents.py [--agents 1000] [--execs 50] [--heartbeat 15] [--window 20] [--enroll 20] [--batch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab_agent.daemon import Agent, Settings  # noqa: E402
from labcore import enroll  # noqa: E402
from labd import migrations, pki  # noqa: E402
from tests.support import start_agent, start_labd, start_postgres  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hub_pid(labd_pid: int) -> int:
    """The `python -m labd.hub` child of labd serve."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if b"labd.hub" in cmd and int(stat[1]) == labd_pid:
                return int(pid)
    raise RuntimeError("no hub process found")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Fleet:
    """Agents in a thread of their own running one asyncio loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.agents: list[Agent] = []
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def start(self, dirs: list[Path], heartbeat: float) -> None:
        async def go():
            for d in dirs:
                a = Agent(Settings(d, exec_user=None, heartbeat_seconds=heartbeat, backoff_cap=5))
                self.agents.append(a)
                asyncio.ensure_future(a.link.run(self.stop))
        asyncio.run_coroutine_threadsafe(go(), self.loop).result()

    def connected(self) -> int:
        return sum(1 for a in self.agents if a.link.connected.is_set())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--heartbeat", type=int, default=15, help="agent_heartbeat_seconds (labd's default: 15)")
    ap.add_argument("--enroll", type=int, default=20, help="agents enrolled through the API (the rest get certificates directly)")
    ap.add_argument("--batch", type=int, default=50, help="agents connected at a time")
    ap.add_argument("--window", type=float, default=20.0, help="seconds over which heartbeat writes are counted")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # enroll's first, pinned, unverified GET /api/v1/ca from many threads
    logging.basicConfig(level=logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    pg = start_postgres()
    work = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    labd = measured = None
    try:
        pg.sql("CREATE DATABASE bench_agents")
        migrations.migrate(pg.url("bench_agents"))
        labd = start_labd(work / "data", pg.url("bench_agents"),
                          env={"LABD_AGENT_HEARTBEAT_SECONDS": str(args.heartbeat), "LABD_POOL_SIZE": "8"})
        admin = labd.session(labd.login())
        r = admin.post(labd.url + "/api/v1/tokens", json={"kind": "agent", "ttl_seconds": 3600, "scope": "*"})
        r.raise_for_status()
        join = r.json()["token"]

        def enroll_one(i: int) -> Path:  # through POST /api/v1/enroll, as lab-agent join does
            a = enroll.enroll(labd.url, join, "agent", f"bench-{i:04d}", {"hostname": f"bench-{i:04d}"})
            return store(i, a["id"], a["key"], a["certificate"], a["ca"], a["hub"])

        def store(i, aid, key, cert, ca, hub_url) -> Path:
            d = work / "agents" / f"a{i:04d}"
            enroll.store_identity(d, key, cert, ca, {"id": aid, "kind": "agent", "name": f"bench-{i:04d}", "hub": hub_url})
            return d

        t0 = time.monotonic()
        real = min(args.agents, args.enroll)
        with ThreadPoolExecutor(4) as ex:
            dirs = list(ex.map(enroll_one, range(real)))
        hub_url = enroll.load_meta(dirs[0])["hub"]
        # the rest: the same certificates (labd.pki), made directly; the setup is not what is measured
        ca = (labd.data_dir / "ca.crt").read_text()
        with psycopg.connect(labd.database_url, autocommit=True) as conn:
            for i in range(real, args.agents):
                aid = str(conn.execute("INSERT INTO agents (hostname, cloud, environment, status) VALUES (%s, 'bench', "
                                       "'bench', 'active') RETURNING id", (f"bench-{i:04d}",)).fetchone()[0])
                key, csr = enroll.new_key_and_csr(f"agent:bench-{i:04d}")
                cert, fp, not_after = pki.sign(labd.data_dir, pki.load_csr(csr.decode()), "agent", aid, 14 * 86400)
                with conn.cursor() as cur:
                    pki.record(cur, fp, "agent", aid, not_after)
                dirs.append(store(i, aid, key, cert, ca, hub_url))
            conn.execute("UPDATE agents SET status = 'active' WHERE status = 'pending'")
        print(f"{len(dirs)} agents enrolled ({real} through POST /api/v1/enroll) in {time.monotonic() - t0:.1f} s", flush=True)

        hub = hub_pid(labd.proc.pid)
        fleet = Fleet()
        rss0 = rss_kib(hub)
        # the measured agent is a real `lab-agent run` of its own (as on a host); the load agents share this process
        measured = start_agent(dirs[0])
        online = "SELECT 1 FROM agents WHERE hostname = 'bench-0000' AND facts <> '{}'::jsonb"
        wait(lambda: query(labd, online), 60, "the measured agent's first beat")
        base = round_trips(labd, admin, "bench-0000", args.execs)

        rss1 = rss_kib(hub)
        for k in range(1, len(dirs), args.batch):  # in batches: one process makes all the TLS handshakes
            fleet.start(dirs[k:k + args.batch], args.heartbeat)
            target = min(len(dirs), k + args.batch) - 1  # dirs[0] is the measured agent, not in the fleet
            wait(lambda target=target: fleet.connected() >= target, 120, f"{target} agents")
        wait(lambda: fleet.connected() == len(dirs) - 1, 120, "all agents")
        time.sleep(args.heartbeat + 6)
        rss2 = rss_kib(hub)

        def upd():
            with psycopg.connect(labd.database_url, autocommit=True) as conn:
                return conn.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'agents'").fetchone()[0]
        u0, t0 = upd(), time.monotonic()
        full = round_trips(labd, admin, "bench-0000", args.execs)
        rest = args.window - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        time.sleep(1.5)  # PostgreSQL publishes table statistics at most once a second
        u1, elapsed = upd(), time.monotonic() - t0
        beats = len(dirs) / args.heartbeat
        ratio = pct(full, 99) / pct(base, 99)
        per_agent = (rss2 - rss1) / max(1, len(dirs) - 1)
        print(f"lab-agents against one labd: 1 `lab-agent run` measured + {len(dirs) - 1} agents in one process (real link "
              f"client), heartbeat every {args.heartbeat} s")
        print(f"  exec round trip, 1 agent connected:     p50={pct(base, 50) * 1000:7.1f} ms  p99={pct(base, 99) * 1000:7.1f} ms")
        print(f"  exec round trip, {len(dirs)} agents connected: p50={pct(full, 50) * 1000:7.1f} ms  "
              f"p99={pct(full, 99) * 1000:7.1f} ms")
        print(f"  ratio exec p99 {len(dirs)} agents / 1 agent: {ratio:.2f}x (target <= 2x)")
        print(f"  heartbeats sent: {beats:.0f}/s; agents rows updated: {(u1 - u0) / elapsed:.0f}/s over {elapsed:.0f} s "
              f"(batched: one statement per hub beat, 5 s, for the agents that beat since the previous one)")
        print(f"  hub memory: {rss0 / 1024:.1f} MiB idle, {rss1 / 1024:.1f} MiB with 1 agent, {rss2 / 1024:.1f} MiB with "
              f"{len(dirs)}: {per_agent:.1f} KiB per connected agent")
        ok = ratio <= 2 and fleet.connected() == len(dirs) - 1 and measured.proc.poll() is None
        print("PASS" if ok else "FAIL")
        fleet.loop.call_soon_threadsafe(fleet.stop.set)
        return 0 if ok else 1
    finally:
        if measured is not None:
            measured.stop()
        if labd is not None:
            labd.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def query(labd, sql: str) -> list:
    with psycopg.connect(labd.database_url, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def round_trips(labd, admin: requests.Session, host: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        r = admin.post(f"{labd.url}/api/v1/agents/{host}/exec", json={"argv": ["true"]})
        r.raise_for_status()
        cid = r.json()["id"]
        while True:
            c = admin.get(f"{labd.url}/api/v1/commands/{cid}").json()
            if c["state"] not in ("queued", "sent"):
                break
            time.sleep(0.01)
        if c["state"] != "done" or c["result"].get("exit_code") != 0:
            raise RuntimeError(f"exec failed: {c}")
        out.append(time.monotonic() - t0)
    return out


if __name__ == "__main__":
    sys.exit(main())
