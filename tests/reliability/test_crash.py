"""Crash safety: kill -9 the whole bastion during a 1,000-machine progress storm, restart it:
every acknowledged update is there, the database is intact, the restart is quick."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.support import REPO, start_bastion, synthetic_mac

MACHINES = 1000


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    todo, found = [pid], []
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _import_queued(data_dir, n):
    """Load n queued machines with known install tokens straight through `lab-bastion import`."""
    import json
    import sys

    doc = {"install_queue": {synthetic_mac(i, "52:54:09"): {"hostname": f"crash{i}", "role": "vanilla", "os": "fedora-43",
                                                             "status": "installing", "token": f"crashtoken{i:012d}xx"}
                             for i in range(n)}}
    src = data_dir.parent / "state.json"
    src.write_text(json.dumps(doc))
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(data_dir), str(src)],
                   check=True, cwd=REPO, capture_output=True)


def test_kill_9_during_progress_storm_loses_no_acknowledged_update(tmp_path, record):
    data = tmp_path / "data"
    data.mkdir()
    _import_queued(data, MACHINES)
    b = start_bastion(data)
    acked: dict[str, int] = {}  # mac -> highest percent the bastion acknowledged
    lock = threading.Lock()
    stop = threading.Event()
    sent = {"n": 0, "ok": 0, "failed": 0}

    def storm(t):
        """One client thread drives machines t, t+64, ...: one update each per round, so all
        1,000 machines are mid-install when the kill comes."""
        s = requests.Session()
        mine = range(t, MACHINES, 64)
        for pct in range(1, 100):
            for i in mine:
                if stop.is_set():
                    return
                m = synthetic_mac(i, "52:54:09")
                try:
                    r = s.post(b.url + "/api/progress", json={"mac": m, "token": f"crashtoken{i:012d}xx", "stage": "packages",
                                                              "percent": pct, "message": ""}, timeout=5)
                except requests.RequestException:
                    with lock:
                        sent["failed"] += 1
                    return
                with lock:
                    sent["n"] += 1
                    if r.status_code == 200:
                        sent["ok"] += 1
                        acked[m] = max(acked.get(m, 0), pct)

    pool = ThreadPoolExecutor(64)
    futures = [pool.submit(storm, t) for t in range(64)]
    deadline = time.monotonic() + 60
    while sent["ok"] < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = [b.proc.pid, *_descendants(b.proc.pid)]
    for pid in victims:  # the whole tree at once, like a power cut of the service
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()
    b.proc.wait()
    with lock:
        acked_snapshot = dict(acked)
        ok = sent["ok"]
    assert ok >= 3000, "the storm did not get going before the kill"

    conn = sqlite3.connect(data / "state.db")
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    assert integrity == "ok"

    t0 = time.monotonic()
    b2 = start_bastion(data, port=None)
    restart_s = time.monotonic() - t0
    try:
        s = b2.session()
        machines = {m["mac"]: m for m in s.get(b2.url + "/api/machines", params={"limit": 1000}).json()["machines"]}
        lost = [m for m, pct in acked_snapshot.items() if (machines[m]["percent"] or 0) < pct]
        events = requests.get(b2.url + "/api/events", params={"limit": 5000}, headers=b2.headers).json()["events"]
        stored_progress = sum(1 for e in events if e["kind"] == "progress")
        first_page_full = len(events) == 5000
        assert not lost, f"{len(lost)} machines lost acknowledged progress, e.g. {lost[:3]}"
        # the machine list and the store answer after the restart
        assert len(machines) == MACHINES
    finally:
        b2.stop()
    record(acknowledged_updates=ok, machines_with_acked_progress=len(acked_snapshot), lost=0,
           integrity_check=integrity, restart_to_healthz_s=round(restart_s, 2),
           progress_events_seen=f">={stored_progress}" if first_page_full else stored_progress)
    assert restart_s < 2.0, f"restart took {restart_s:.2f} s"
    assert re.search(r"Booting worker", b2.log())
