#!/usr/bin/env python3
"""Progress updates per second with 10,000 machines in the store.

Contender: the bastion's SQLite Store (WAL, one IMMEDIATE transaction per update that checks the
install token, applies the lifecycle table, updates the row and appends an event), at its default
synchronous=FULL (and NORMAL for reference).
Baseline: the seed's StateManager approach, the same state kept as one JSON document that is
updated immutably and rewritten (temp file + rename) on each update.
Target: contender >= 20 x baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bastion_app.store import Store  # noqa: E402
from tests.support import synthetic_mac  # noqa: E402

HW = {"cpu": {"model": "Xeon", "cores": 16, "threads": 32, "arch": "x86_64"}, "memory_mb": 131072,
      "disks": [{"name": "nvme0n1", "size_bytes": 960197124096, "model": "SAMSUNG MZQL2960HCJR", "serial": "S64FNE0R000000",
                 "rotational": False, "removable": False, "transport": "nvme"}],
      "nics": [{"name": "eno1", "mac": "00:00:00:00:00:00", "driver": "ixgbe", "link": True, "speed_mbps": 10000}],
      "dmi": {"vendor": "Dell Inc.", "product": "PowerEdge R650", "serial": "ABC1234", "uuid": "4c4c4544-0000", "bios_vendor": "Dell", "bios_version": "1.9.2"},
      "firmware": "uefi"}


def mac(i: int) -> str:
    return synthetic_mac(i, "52:54:02")


def fill_store(path: Path, n: int, synchronous: str) -> tuple[Store, dict[str, str]]:
    s = Store(path, synchronous="NORMAL")
    tokens = {}
    with s.tx() as c:  # bulk load through the same tables (setup, not measured)
        now = time.time()
        for i in range(n):
            m = mac(i)
            tokens[m] = f"tok{i:024d}"
            c.execute("INSERT INTO machines(mac,state,hostname,role,os,disk,ssh_keys,hardware,install_token,created_at,updated_at,state_changed_at,install_started_at)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (m, "installing", f"n{i}", "worker", "fedora-43", "", "[]", json.dumps(HW), tokens[m], now, now, now, now))
    s.close()
    return Store(path, synchronous=synchronous), tokens


def bench_store(n: int, updates: int, synchronous: str, tmp: Path) -> float:
    store, tokens = fill_store(tmp / f"state-{synchronous}.db", n, synchronous)
    macs = list(tokens)
    t0 = time.perf_counter()
    for k in range(updates):
        m = macs[(k * 7919) % n]
        store.progress(m, token=tokens[m], stage="packages", percent=k % 100, message=f"update {k}", ip="10.0.0.9")
    dt = time.perf_counter() - t0
    assert len(store.events(limit=updates + 1)) == updates
    store.close()
    return updates / dt


def bench_json(n: int, updates: int, tmp: Path) -> float:
    """The seed's StateManager: immutable update, then the whole state.json rewritten."""
    path = tmp / "state.json"
    state = {"discovered": {}, "install_queue": {mac(i): {"hostname": f"n{i}", "role": "worker", "os": "fedora-43", "disk": "",
                                                          "hardware": HW, "token": f"tok{i:024d}", "stage": None, "percent": 0}
                                                   for i in range(n)}, "installed": {}, "debug": {}}
    path.write_text(json.dumps(state))
    macs = list(state["install_queue"])
    t0 = time.perf_counter()
    for k in range(updates):
        m = macs[(k * 7919) % n]
        entry = {**state["install_queue"][m], "stage": "packages", "percent": k % 100, "message": f"update {k}"}
        state = {**state, "install_queue": {**state["install_queue"], m: entry}}
        tmpf = path.with_suffix(".tmp")
        tmpf.write_text(json.dumps(state))  # one C-encoder pass, like JSON.stringify
        os.replace(tmpf, path)
    dt = time.perf_counter() - t0
    assert json.loads(path.read_text())["install_queue"][macs[((updates - 1) * 7919) % n]]["percent"] == (updates - 1) % 100
    return updates / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=10_000)
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--baseline-updates", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as d:
        tmp = Path(d)
        base = bench_json(args.machines, args.baseline_updates, tmp)
        full = bench_store(args.machines, args.updates, "FULL", tmp)
        normal = bench_store(args.machines, args.updates, "NORMAL", tmp)
    ratio = full / base
    print(f"machines in store:                 {args.machines}")
    print(f"baseline (seed StateManager, JSON rewrite per update): {base:10.1f} updates/s")
    print(f"sqlite store, synchronous=FULL (default):             {full:10.1f} updates/s")
    print(f"sqlite store, synchronous=NORMAL:                      {normal:10.1f} updates/s")
    print(f"ratio FULL/baseline: {ratio:.1f}x (target >= 20x) {'PASS' if ratio >= 20 else 'FAIL'}")
    return 0 if ratio >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
