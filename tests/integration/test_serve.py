"""A real `lab-bastion serve` (gunicorn, 4 workers): the CLI, the token, concurrency."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter

import requests

from tests.support import HW, REPO, synthetic_mac


def lab_bastion(*args, check=True, **kw):
    return subprocess.run([sys.executable, "-m", "bastion_app.cli", *args], capture_output=True, text=True,
                          cwd=REPO, check=check, **kw)


def mac(i: int) -> str:
    return synthetic_mac(i, "52:54:01")


def queue_and_token(b, s, m, hostname):
    assert s.post(b.url + "/api/discover", json={"mac": m, "hardware": HW}).status_code == 200
    assert s.post(b.url + "/api/install", json={"mac": m, "hostname": hostname, "role": "vanilla", "os": "fedora-43"}).status_code == 202
    text = requests.get(b.url + "/dispatch", params={"mac": m}).text
    return re.search(r"token=([A-Za-z0-9_-]+)", text).group(1)


def test_token_command_and_file_mode(bastion):
    out = lab_bastion("token", "--data-dir", str(bastion.data_dir)).stdout.strip()
    assert out == bastion.token and len(out) >= 32
    assert (bastion.data_dir / "token").stat().st_mode & 0o777 == 0o600
    assert bastion.token not in bastion.log()
    env = {**os.environ, "LAB_BASTION_DATA_DIR": str(bastion.data_dir)}
    assert lab_bastion("token", env=env).stdout.strip() == bastion.token


def test_several_gunicorn_workers(bastion):
    log = bastion.log()
    assert "Using worker: gthread" in log
    assert len(re.findall(r"Booting worker with pid", log)) >= 4


def test_concurrent_updates_lose_nothing(bastion):
    """32 threads, 4 workers: each thread posts progress for its own machine and for 4 shared
    machines. Every acknowledged update must be in the event history; no client sees a lock error."""
    s = bastion.session()
    own = {i: mac(1000 + i) for i in range(32)}
    shared = [mac(2000 + i) for i in range(4)]
    tokens = {m: queue_and_token(bastion, s, m, f"c{m.replace(':', '')}") for m in [*own.values(), *shared]}
    acked: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int):
        sess = requests.Session()
        for n in range(25):
            for m in (own[i], shared[n % 4]):
                r = sess.post(bastion.url + "/api/progress", json={"mac": m, "token": tokens[m], "stage": "packages",
                                                                   "percent": n, "message": f"t{i} n{n}"})
                with lock:
                    if r.status_code == 200:
                        acked[m] += 1
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for m, n in acked.items():
        d = s.get(f"{bastion.url}/api/machines/{m}", params={"events": 5000}).json()
        progress_events = [e for e in d["events"] if e["kind"] == "progress"]
        assert len(progress_events) == n, m
    assert sum(acked.values()) == 32 * 25 * 2
    assert "database is locked" not in bastion.log()


def test_export_import_cli(bastion, tmp_path):
    s = bastion.session()
    queue_and_token(bastion, s, mac(3000), "exported1")
    out = tmp_path / "state.json"
    lab_bastion("export", "--data-dir", str(bastion.data_dir), "-o", str(out))
    doc = json.loads(out.read_text())
    assert set(doc) == {"discovered", "install_queue", "installed", "debug"}
    assert doc["install_queue"][mac(3000)]["hostname"] == "exported1"
    fresh = tmp_path / "fresh"
    r = lab_bastion("import", "--data-dir", str(fresh), str(out))
    assert "imported" in r.stdout
    again = json.loads(lab_bastion("export", "--data-dir", str(fresh)).stdout)
    assert set(again["install_queue"]) == set(doc["install_queue"])
    # importing again without --replace changes nothing and says why
    r = lab_bastion("import", "--data-dir", str(fresh), str(out), check=False)
    assert r.returncode != 0 and "already in the store" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"installed": {mac(1): {"hostname": "x\ny", "role": "worker", "os": "fedora-43"}}}))
    r = lab_bastion("import", "--data-dir", str(tmp_path / "other"), str(bad), check=False)
    assert r.returncode != 0 and "hostname" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_bad_settings(tmp_path):
    r = lab_bastion("serve", "--data-dir", str(tmp_path), "--listen", "nope", check=False, timeout=30)
    assert r.returncode != 0 and "HOST:PORT" in r.stderr
    r = lab_bastion("serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:1", "--dhcp-mode", "full",
                    "--interface", "lo", check=False, timeout=30)
    assert r.returncode != 0 and "--dhcp-range" in r.stderr
