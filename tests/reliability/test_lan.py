"""An attacker on the provisioning LAN (issue 15: findings 1, 3, 6, 7). Other hosts are other
127.x source addresses (all of 127/8 is this machine): the machine is one address, the attacker
another. Every run is bounded (a few seconds)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.support import REPO, TOKEN_RE, UEFI_HW, call_from, start_bastion, synthetic_mac, wait_for

ATTACKER = "127.0.9.9"


def _install(b, mac: str, hostname: str, machine_ip: str) -> None:
    """discover (from the machine's address) and queue an install."""
    st, body = call_from(b, machine_ip, "POST", "/api/discover", {"mac": mac, "hardware": UEFI_HW})
    assert st == 200, body
    r = requests.post(b.url + "/api/install", headers=b.headers, timeout=10,
                      json={"mac": mac, "hostname": hostname, "role": "worker", "os": "fedora-43"})
    assert r.status_code == 202, r.text


def _machine(b, mac: str) -> dict:
    return requests.get(f"{b.url}/api/machines/{mac}", headers=b.headers, timeout=10).json()


def _script(status: int, text: str) -> bool:
    return status == 200 and text.startswith("#!ipxe")


# -- finding 1: the install token is bound to the machine's address -------------------------------
def test_install_token_goes_only_to_the_first_address(bastion, record):
    mac, ip = "52:54:00:15:01:01", "127.0.1.11"
    _install(bastion, mac, "bind-first", ip)
    st, text = call_from(bastion, ip, "GET", f"/dispatch?mac={mac}")
    assert _script(st, text) and TOKEN_RE.search(text)
    token = TOKEN_RE.search(text).group(1)
    # another host asks for the same MAC's script: a script, without the token
    st, text = call_from(bastion, ATTACKER, "GET", f"/dispatch?mac={mac}")
    assert _script(st, text) and "token=" not in text, text
    # with a stolen token, nothing is accepted from another address
    refused = {
        "ks": call_from(bastion, ATTACKER, "GET", f"/ks?mac={mac}&token={token}")[0],
        "complete": call_from(bastion, ATTACKER, "POST", "/api/progress", {"mac": mac, "token": token, "stage": "complete"})[0],
        "log": call_from(bastion, ATTACKER, "POST", "/api/log", {"mac": mac, "token": token, "lines": ["forged"]})[0],
    }
    assert set(refused.values()) == {403}, refused
    assert _machine(bastion, mac)["state"] == "installing"
    # the machine itself goes on
    assert call_from(bastion, ip, "GET", f"/ks?mac={mac}&token={token}")[0] == 200
    assert call_from(bastion, ip, "POST", "/api/progress", {"mac": mac, "token": token, "stage": "packages", "percent": 40})[0] == 200
    record(binding="first address", forged_requests_refused=len(refused))


def test_a_dhcp_lease_decides_even_before_the_machine_asks(bastion, record):
    """Full DHCP: the bastion's dnsmasq leased 127.0.1.12 to the MAC, so an attacker who asks
    first gets no token and the machine's own address does."""
    mac, ip = "52:54:00:15:01:02", "127.0.1.12"
    run = bastion.data_dir / "run"
    run.mkdir(exist_ok=True)
    (run / "dnsmasq.leases").write_text(f"{int(time.time()) + 3600} {mac} {ip} node *\n")
    try:
        _install(bastion, mac, "bind-lease", ip)
        st, text = call_from(bastion, ATTACKER, "GET", f"/dispatch?mac={mac}")
        assert _script(st, text) and "token=" not in text, text
        st, text = call_from(bastion, ip, "GET", f"/dispatch?mac={mac}")
        assert _script(st, text) and TOKEN_RE.search(text), text
    finally:
        (run / "dnsmasq.leases").unlink()
    record(binding="dhcp lease")


def test_a_debug_boot_is_not_taken_by_another_host(bastion):
    mac, ip = "52:54:00:15:01:03", "127.0.1.13"
    assert call_from(bastion, ip, "POST", "/api/discover", {"mac": mac, "hardware": UEFI_HW})[0] == 200
    assert requests.post(bastion.url + "/api/debug", headers=bastion.headers, json={"mac": mac, "mode": "rescue"}).status_code == 202
    st, text = call_from(bastion, ATTACKER, "GET", f"/dispatch?mac={mac}")
    assert _script(st, text) and "rescue" not in text.lower()
    assert _machine(bastion, mac)["debug"] == "rescue", "the one-shot debug boot is still pending"
    st, text = call_from(bastion, ip, "GET", f"/dispatch?mac={mac}")
    assert _script(st, text) and "rescue" in text.lower()
    assert _machine(bastion, mac)["debug"] is None


# -- finding 3: discovery abuse -----------------------------------------------------------------
def test_discover_does_not_overwrite_a_known_machine(bastion):
    mac, ip = "52:54:00:15:03:01", "127.0.3.11"
    assert call_from(bastion, ip, "POST", "/api/discover", {"mac": mac, "hardware": UEFI_HW})[0] == 200
    forged = {"mac": mac, "hardware": {"firmware": "bios", "memory_mb": 1}}
    assert call_from(bastion, ATTACKER, "POST", "/api/discover", forged)[0] == 403
    m = _machine(bastion, mac)
    assert m["ip"] == ip and m["hardware"]["memory_mb"] == UEFI_HW["memory_mb"]
    # not during an install either, not even from its own address
    requests.post(bastion.url + "/api/install", headers=bastion.headers,
                  json={"mac": mac, "hostname": "disc-own", "role": "worker", "os": "fedora-43"})
    assert call_from(bastion, ip, "GET", f"/dispatch?mac={mac}")[0] == 200
    assert call_from(bastion, ip, "POST", "/api/discover", forged)[0] == 403
    m = _machine(bastion, mac)
    assert m["state"] == "installing" and m["hardware"]["memory_mb"] == UEFI_HW["memory_mb"]


def _burst_discoveries(b, source: str, n: int, prefix: str) -> dict[int, int]:
    codes: dict[int, int] = {}
    for i in range(n):
        st, _ = call_from(b, source, "POST", "/api/discover", {"mac": synthetic_mac(i, prefix), "hardware": UEFI_HW})
        codes[st] = codes.get(st, 0) + 1
    return codes


def test_discovery_flood_and_hardware_are_bounded(tmp_path, record):
    b = start_bastion(tmp_path / "data", workers=2, env={
        "LAB_BASTION_DISCOVER_BURST": "10", "LAB_BASTION_DISCOVER_RATE": "1",
        "LAB_BASTION_MAX_MACHINES": "40", "LAB_BASTION_MAX_HARDWARE_BYTES": "4096"})
    try:
        t0 = time.monotonic()
        codes = _burst_discoveries(b, "127.0.3.21", 60, "52:54:31")
        elapsed = time.monotonic() - t0
        created = codes.get(200, 0)
        # 2 workers x (10 at once + 1/s): the rest is answered 429
        assert created <= 2 * (10 + elapsed + 1) and codes.get(429, 0) > 0, codes
        # other hosts fill the store up to max_machines, and no further
        for k in range(8):
            _burst_discoveries(b, f"127.0.3.{30 + k}", 8, f"52:54:{0x32 + k:02x}")
        total = len(requests.get(b.url + "/api/machines", headers=b.headers, params={"limit": 1000}).json()["machines"])
        assert total == 40
        st, body = call_from(b, "127.0.3.50", "POST", "/api/discover", {"mac": "52:54:00:15:03:50", "hardware": UEFI_HW})
        assert st == 503 and "max_machines" in body
        # one machine's hardware is bounded in bytes
        big = {**UEFI_HW, "disks": [{"name": f"sd{i}", "model": "m" * 200, "serial": "s" * 200} for i in range(40)]}
        st, body = call_from(b, "127.0.3.51", "POST", "/api/discover", {"mac": "52:54:00:15:03:51", "hardware": big})
        assert st == 413 and "max_hardware_bytes" in body
        db_bytes = (b.data_dir / "state.db").stat().st_size
    finally:
        b.stop()
    record(flood_sent=60, flood_created=created, flood_seconds=round(elapsed, 2), machines_cap=40, state_db_bytes=db_bytes)


def test_machines_are_listed_in_pages(bastion, record):
    macs = {synthetic_mac(i, "52:54:33") for i in range(25)}
    for i, mac in enumerate(sorted(macs)):
        assert call_from(bastion, f"127.0.33.{i + 1}", "POST", "/api/discover", {"mac": mac, "hardware": UEFI_HW})[0] == 200
    seen, pages, cursor = [], 0, None
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        doc = requests.get(bastion.url + "/api/machines", headers=bastion.headers, params=params, timeout=10).json()
        assert len(doc["machines"]) <= 7
        seen += [m["mac"] for m in doc["machines"]]
        pages += 1
        cursor = doc.get("next")
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and macs <= set(seen)
    assert requests.get(bastion.url + "/api/machines", headers=bastion.headers, params={"cursor": "junk"}).status_code == 400
    # labctl and the inventory plugin's client follow the pages
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABCTL_URL": bastion.url, "LABCTL_TOKEN": bastion.token}
    code = ("import json,sys; from labctl.client import Client; from plugins.module_utils.lab_client import LabClient;"
            f"a=[m['mac'] for m in Client('{bastion.url}', '{bastion.token}').machines(page_size=7)];"
            f"b=[m['mac'] for m in LabClient('{bastion.url}', '{bastion.token}').machines(page_size=7)];"
            "print(json.dumps([a,b]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    a, c = json.loads(out.stdout)
    assert a == seen and c == seen
    record(machines=len(seen), pages_of_7=pages)


# -- finding 6: /dispatch always answers a script ----------------------------------------------
def test_dispatch_answers_a_script_during_cancel_and_forget_races(bastion, record):
    op = bastion.session()
    bad, rounds = [], 200
    for i in range(rounds):
        mac, ip = synthetic_mac(i, "52:54:66"), f"127.0.66.{i % 250 + 1}"
        _install(bastion, mac, f"race{i}", ip)
        results: list = []
        go = threading.Barrier(2)

        def boot(mac=mac, ip=ip, go=go, results=results):
            go.wait()
            results.append(call_from(bastion, ip, "GET", f"/dispatch?mac={mac}"))

        t = threading.Thread(target=boot)
        t.start()
        go.wait()
        if i % 2:
            op.delete(f"{bastion.url}/api/machines/{mac}")
        else:
            op.post(f"{bastion.url}/api/machines/{mac}/cancel")
        t.join()
        st, text = results[0]
        if not _script(st, text):
            bad.append((st, text[:80]))
        if i % 2 == 0:
            op.delete(f"{bastion.url}/api/machines/{mac}")
    record(races=rounds, non_script_answers=len(bad))
    assert bad == [], f"{len(bad)} of {rounds} dispatches were not iPXE scripts: {bad[:3]}"


# -- finding 7: smaller ones ------------------------------------------------------------------
def test_state_and_export_are_private(bastion, tmp_path):
    for name in ("state.db", "state.db-wal", "state.db-shm", "logs.db"):
        f = bastion.data_dir / name
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (name, oct(f.stat().st_mode))
    out = tmp_path / "export.json"
    subprocess.run([sys.executable, "-m", "bastion_app.cli", "export", "--data-dir", str(bastion.data_dir), "-o", str(out)],
                   check=True, cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_machine_facing_errors_do_not_tell_whether_a_mac_exists(bastion):
    known, unknown, ip = "52:54:00:15:07:01", "52:54:00:15:07:02", "127.0.7.11"
    assert call_from(bastion, ip, "POST", "/api/discover", {"mac": known, "hardware": UEFI_HW})[0] == 200
    queued = "52:54:00:15:07:03"
    _install(bastion, queued, "uniform", "127.0.7.12")
    token = "A" * 32
    answers = set()
    for mac in (known, unknown, queued):
        for method, path, body in (("GET", f"/ks?mac={mac}&token={token}", None),
                                   ("GET", f"/autoinstall/{mac}/{token}/user-data", None),
                                   ("POST", "/api/progress", {"mac": mac, "token": token, "stage": "packages"}),
                                   ("POST", "/api/log", {"mac": mac, "token": token, "lines": ["x"]}),
                                   ("POST", f"/api/installer-events/{mac}/{token}", {"event_type": "start", "name": "x"})):
            st, text = call_from(bastion, ip, method, path, body)
            answers.add((st, json.loads(text)["error"]))
    assert len(answers) == 1, answers


def test_bad_requests_from_many_hosts_are_limited_in_total(tmp_path, record):
    b = start_bastion(tmp_path / "data", workers=2)
    try:
        def host(i: int) -> list[int]:
            source = f"127.0.{70 + i // 250}.{i % 250 + 1}"
            return [call_from(b, source, "GET", "/api/machines/52:54:00:00:00:00")[0] for _ in range(4)]

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = [st for sts in pool.map(host, range(500)) for st in sts]
        elapsed = time.monotonic() - t0
        codes = {st: answers.count(st) for st in set(answers)}
        # a host that made no mistakes is still served, and every host gets its boot script
        assert call_from(b, "127.0.72.1", "GET", "/dispatch?mac=52:54:00:15:07:99")[0] == 200
        assert call_from(b, "127.0.70.1", "GET", "/dispatch?mac=52:54:00:15:07:98")[0] == 200
    finally:
        b.stop()
    record(sources=500, bad_requests=2000, refused_429=codes.get(429, 0), seconds=round(elapsed, 1))
    assert codes.get(429, 0) > 0, codes


def test_closed_followers_free_their_slots_at_once(tmp_path, record):
    import http.client

    b = start_bastion(tmp_path / "data", workers=1, env={"LAB_BASTION_FOLLOWERS": "2"})
    try:
        mac = "52:54:00:15:07:21"
        _install(b, mac, "follow-slots", "127.0.7.21")
        host, port = b.url.split("//")[1].split(":")
        conns = []
        for _ in range(2):
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            c.request("GET", f"/api/logs/{mac}/follow?heartbeat=300", headers=b.headers)
            r = c.getresponse()
            assert r.status == 200
            r.readline()
            conns.append((c, r))
        assert requests.get(f"{b.url}/api/logs/{mac}/follow", headers=b.headers, timeout=5).status_code == 503
        for c, r in conns:
            r.close()
            c.close()
        t0 = time.monotonic()

        def free():
            r = requests.get(f"{b.url}/api/logs/{mac}/follow?heartbeat=300", headers=b.headers, stream=True, timeout=5)
            r.close()
            return r.status_code == 200

        wait_for(free, timeout=10, interval=0.2, what="a follower slot freed")
        freed_s = time.monotonic() - t0
    finally:
        b.stop()
    record(slot_freed_after_s=round(freed_s, 2))
    assert freed_s < 5


def test_the_reliability_tables_are_well_formed():
    text = (Path(REPO) / "docs" / "reliability.md").read_text()
    for table in re.findall(r"(?:^\|.*\|\n)+", text, re.M):
        rows = [r for r in table.splitlines() if not re.fullmatch(r"\|[-| ]+\|", r)]
        width = rows[0].count("|")
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert row.count("|") == width and all(cells), f"a malformed row in docs/reliability.md: {row[:120]}"
            assert not re.search(r"(?<![A-Z])_[A-Z]{3,}\b", row), f"a placeholder in docs/reliability.md: {row[:120]}"
            assert len(set(cells[1:])) == len(cells[1:]), f"a cell repeated in docs/reliability.md: {row[:120]}"

