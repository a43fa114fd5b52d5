"""Several gunicorn workers and the syslog listener writing at once: progress posts and log
posts over HTTP, syslog datagrams over UDP, for the same machines. Nothing acknowledged is lost,
every datagram is stored under the right machine, no lock error reaches a client."""

from __future__ import annotations

import re
import socket
import threading
import time

import requests
from requests.adapters import HTTPAdapter

from tests.support import start_bastion

MACHINES = 8
PROGRESS_PER_MACHINE = 60
SYSLOG_PER_MACHINE = 400
API_LOG_POSTS = 20


class From(HTTPAdapter):
    def __init__(self, ip: str):
        self.ip = ip
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.ip, 0)
        super().init_poolmanager(*args, **kwargs)


def test_workers_and_syslog_listener_write_at_once(tmp_path, record):
    b = start_bastion(tmp_path / "data")
    try:
        syslog_port = int(re.search(r"listening on udp and tcp [0-9.]+:(\d+)", b.log()).group(1)) \
            if re.search(r"listening on udp and tcp [0-9.]+:(\d+)", b.log()) else None
        assert syslog_port, "the syslog listener did not say where it listens:\n" + b.log()[-2000:]
        op = b.session()
        machines = []
        for i in range(MACHINES):
            mac, ip = f"52:54:0c:00:00:{i:02x}", f"127.0.1.{i + 10}"
            s = requests.Session()
            s.mount("http://", From(ip))
            assert s.post(b.url + "/api/discover", json={"mac": mac, "hardware": {}}).status_code == 200
            assert op.post(b.url + "/api/install", json={"mac": mac, "hostname": f"conc{i}", "role": "worker",
                                                         "os": "fedora-43"}).status_code == 202
            token = re.search(r"token=([A-Za-z0-9_-]+)", s.get(b.url + "/dispatch", params={"mac": mac}).text).group(1)
            machines.append((mac, ip, token, s))

        errors: list[str] = []
        acked = {m[0]: 0 for m in machines}
        api_lines = {m[0]: 0 for m in machines}
        lock = threading.Lock()

        def progress(mac, ip, token, s):
            for n in range(PROGRESS_PER_MACHINE):
                r = s.post(b.url + "/api/progress", json={"mac": mac, "token": token, "stage": "packages",
                                                          "percent": n % 100, "message": f"step {n}"})
                with lock:
                    if r.status_code == 200:
                        acked[mac] += 1
                    else:
                        errors.append(f"progress {r.status_code} {r.text[:120]}")
                if n % 3 == 0:
                    r = s.post(b.url + "/api/log", json={"mac": mac, "token": token, "lines": [f"api line {n} a", f"api line {n} b"]})
                    with lock:
                        if r.status_code == 200:
                            api_lines[mac] += 2
                        else:
                            errors.append(f"log {r.status_code} {r.text[:120]}")

        def syslog(mac, ip):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, 0))
            for n in range(SYSLOG_PER_MACHINE):
                sock.sendto(f"<30>Nov 26 12:00:00 {mac.replace(':', '')} anaconda[42]: syslog line {n} of {mac}".encode(),
                            ("127.0.0.1", syslog_port))
                if n % 50 == 49:
                    time.sleep(0.02)  # a fast installer, not a flood
            sock.close()

        threads = [threading.Thread(target=progress, args=m) for m in machines]
        threads += [threading.Thread(target=syslog, args=m[:2]) for m in machines]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0

        assert errors == []
        stored_syslog = {}
        deadline = time.monotonic() + 20
        for mac, *_ in machines:
            while True:
                d = op.get(f"{b.url}/api/logs/{mac}", params={"limit": 5000}).json()
                texts = [ln["text"] for ln in d["lines"]]
                stored_syslog[mac] = sum(1 for t in texts if f"of {mac}" in t)
                if stored_syslog[mac] >= SYSLOG_PER_MACHINE or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert sum(1 for t in texts if t.startswith("api line")) == api_lines[mac]
            events = op.get(f"{b.url}/api/machines/{mac}", params={"events": 5000}).json()["events"]
            assert sum(1 for e in events if e["kind"] == "progress" and e["actor"] == "machine"
                       and (e["data"].get("message") or "").startswith("step ")) == acked[mac]
        unattributed = op.get(f"{b.url}/api/logs/unattributed", params={"limit": 5000}).json()["lines"]
        log = b.log()
    finally:
        b.stop()
    assert stored_syslog == {m[0]: SYSLOG_PER_MACHINE for m in machines}
    assert not [ln for ln in unattributed if "syslog line" in ln["text"]]
    assert "database is locked" not in log and "Traceback" not in log
    record(machines=MACHINES, progress_acked=sum(acked.values()), api_log_lines=sum(api_lines.values()),
           syslog_sent=MACHINES * SYSLOG_PER_MACHINE, syslog_stored=sum(stored_syslog.values()),
           lost=0, lock_errors=0, seconds=round(elapsed, 1))
