#!/usr/bin/env python3
"""200 concurrent log followers during a boot storm.

Against one `lab-bastion serve` (gunicorn, 4 workers): a boot storm (bench/boot_storm.py: 1,000
machines, 200 at a time, GET /dispatch + 5 progress posts each) runs twice, first with no
followers (the baseline), then while 200 followers stream `GET /api/logs/<mac>/follow` of 200 of
the storming machines. Afterwards each followed install is completed, so every stream ends, and
what each follower received is compared with the machine's timeline in the store: no follower may
miss an event. Prints dispatch p99 without and with followers and their ratio (target <= 2x).

    python bench/follow.py [--machines 1000] [--concurrency 200] [--followers 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.boot_storm import all_machines, queue_machines, run_storm, start_server  # noqa: E402
from tests.support import TOKEN_RE, synthetic_mac  # noqa: E402


class Follower(threading.Thread):
    """Follows one machine until its stream ends; reconnects with Last-Event-ID if refused or cut."""

    def __init__(self, url: str, token: str, mac: str):
        super().__init__(daemon=True)
        self.host, self.port = url.split("//")[1].split(":")
        self.token, self.mac = token, mac
        self.ids: list[int] = []  # state-store event ids of the progress/state events received
        self.end: dict | None = None
        self.connected = threading.Event()
        self.reconnects = 0
        self.error: str | None = None

    def run(self) -> None:
        last = None
        deadline = time.monotonic() + 600
        while self.end is None and time.monotonic() < deadline:  # bounded: ends or times out
            conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
            headers = {"Authorization": f"Bearer {self.token}"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                conn.request("GET", f"/api/logs/{self.mac}/follow?heartbeat=5", headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    self.reconnects += 1
                    time.sleep(0.5)
                    continue
                self.connected.set()
                event = None
                while True:
                    raw = resp.readline()
                    if not raw:
                        break
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("id: "):
                        last = line[4:]
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if event in ("progress", "state") and (not self.ids or self.ids[-1] != data["id"]):
                            self.ids.append(data["id"])
                        elif event == "end":
                            self.end = data
                            return
                self.reconnects += 1
            except (OSError, http.client.HTTPException) as exc:
                self.error = repr(exc)
                self.reconnects += 1
                time.sleep(0.5)
            finally:
                conn.close()


def expected_ids(url: str, token: str, mac: str) -> list[int]:
    """The ids of the machine's timeline events (progress and state changes) in the store."""
    r = requests.get(f"{url}/api/logs/{mac}", headers={"Authorization": f"Bearer {token}"}, params={"limit": 1}, timeout=30)
    ids: list[int] = []
    for item in r.json()["progress"]:
        if not ids or ids[-1] != item["id"]:
            ids.append(item["id"])
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--followers", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-follow-") as d:
        server = start_server(Path(d) / "data", workers=args.workers)
        try:
            base_macs = [synthetic_mac(i, "52:54:05") for i in range(args.machines)]
            macs = [synthetic_mac(i, "52:54:06") for i in range(args.machines)]
            queue_machines(server, base_macs + macs)

            base = run_storm(server.url, base_macs, args.concurrency)

            step = max(1, len(macs) // args.followers)
            followed = macs[::step][: args.followers]
            followers = [Follower(server.url, server.token, m) for m in followed]
            for f in followers:
                f.start()
            for f in followers:
                f.connected.wait(60)
            connected = sum(f.connected.is_set() for f in followers)
            res = run_storm(server.url, macs, args.concurrency)

            # end every followed install (a token is in its boot script), so every stream ends
            with requests.Session() as s:
                for m in followed:
                    tok = TOKEN_RE.search(s.get(server.url + "/dispatch", params={"mac": m}, timeout=30).text).group(1)
                    s.post(server.url + "/api/progress", json={"mac": m, "token": tok, "stage": "complete"}, timeout=30)
            for f in followers:
                f.join(120)
            missed, ended = [], 0
            for f in followers:
                want = expected_ids(server.url, server.token, f.mac)
                if f.end is not None:
                    ended += 1
                if f.ids != want:
                    missed.append((f.mac, sorted(set(want) - set(f.ids)), f.error))
            states = all_machines(server)
        finally:
            server.stop()
    p99_base, p99_follow = base.pct("dispatch", 99), res.pct("dispatch", 99)
    ratio = p99_follow / p99_base
    reconnects = sum(f.reconnects for f in followers)
    print(f"log followers during a boot storm: {args.machines} machines, {args.concurrency} at a time, "
          f"{args.workers} gunicorn workers (gthread)")
    print(f"  baseline storm, no followers:  dispatch p50={base.pct('dispatch', 50):7.1f} ms  p99={p99_base:7.1f} ms  "
          f"errors={len(base.errors)}")
    print(f"  storm with {len(followers)} followers:      dispatch p50={res.pct('dispatch', 50):7.1f} ms  p99={p99_follow:7.1f} ms  "
          f"errors={len(res.errors)}")
    print(f"  ratio dispatch p99 with/without followers: {ratio:.2f}x (target <= 2x)")
    print(f"  followers connected: {connected}/{len(followers)}, streams ended cleanly: {ended}, reconnects: {reconnects}, "
          f"followers that missed an event: {len(missed)}")
    print(f"  events per followed machine: {sum(len(f.ids) for f in followers) / max(1, len(followers)):.1f}; "
          f"machines in store: {len(states)}")
    for m in missed[:5]:
        print("  missed:", m)
    ok = not missed and ended == len(followers) and ratio <= 2.0 and not res.errors and not base.errors
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
