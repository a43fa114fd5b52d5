"""Bastions joined to labd (issue 17), with real processes: PostgreSQL, `labd serve` (API + hub),
three `lab-bastion serve` with data directories of their own, `lab-bastion join`.

Enrollment and its refusals, the link (mTLS, versions), replication of machines and events,
commands routed through labd (at most once, offline refusal, --queue), autonomy and catch-up,
faults (kill -9 labd, a link killed mid-command, PostgreSQL restarted) and security (another CA,
expired and revoked certificates, a replayed join token, one bastion's rows against another's).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
import requests

from tests.support import REPO, Machines, start_bastion, start_labd, stop_process, wait_for

N_MACHINES = 50  # per bastion (3 bastions); the 3 x 300 scale runs in bench/labd_fleet.py


def mac(b: int, i: int) -> str:
    return f"52:54:{b:02x}:00:{i // 256:02x}:{i % 256:02x}"


def join(labd, admin, data_dir, name, *, uses=1, ttl=3600, scope="*", extra=()) -> subprocess.CompletedProcess:
    tok = admin.post(labd.url + "/api/v1/tokens", json={"kind": "bastion", "ttl_seconds": ttl, "uses": uses,
                                                          "scope": scope}).json()["token"]
    return bastion_join(labd.url, tok, data_dir, name, *extra)


def bastion_join(url, tok, data_dir, name, *extra) -> subprocess.CompletedProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "bastion_app.cli", "join", "--data-dir", str(data_dir), "--labd", url,
                           "--token", tok, "--name", name, *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def servers(admin, labd, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        r = admin.get(labd.url + "/api/v1/servers", params={**params, "limit": 500, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        out += r.json()["servers"]
        cursor = r.json()["next"]
        if not cursor:
            return out


def db(labd):
    return psycopg.connect(labd.database_url, autocommit=True)


def bastion_rows(labd, name) -> dict:
    with db(labd) as c:
        return c.execute("SELECT * FROM bastions WHERE name = %s", (name,)).fetchone()


def events_in_labd(labd, name) -> list[int]:
    with db(labd) as c:
        return [r[0] for r in c.execute("SELECT event_id FROM bastion_events WHERE bastion = %s ORDER BY event_id", (name,))]


def events_on_bastion(b) -> list[int]:
    with sqlite3.connect(b.data_dir / "state.db") as c:
        return [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")]


def caught_up(labd, b, name) -> bool:
    return events_in_labd(labd, name) == events_on_bastion(b)


def audit(admin, labd, action) -> list[dict]:
    return admin.get(labd.url + "/api/v1/audit", params={"action": action, "limit": 500}).json()["audit"]


@pytest.fixture(scope="module")
def labd(postgres, tmp_path_factory):
    postgres.sql("CREATE DATABASE labd_link TEMPLATE labd_template")
    server = start_labd(tmp_path_factory.mktemp("labd-link") / "data", postgres.url("labd_link"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def fleet(labd, admin, tmp_path_factory):
    """Three joined bastions (b1, b2, b3), each serving; 50 machines discovered on each."""
    root = tmp_path_factory.mktemp("fleet")
    started = {}
    for i in (1, 2, 3):
        d = root / f"b{i}"
        r = join(labd, admin, d, f"b{i}", extra=("--cloud", "lab1", "--environment", "dev" if i < 3 else "prod"))
        assert r.returncode == 0, r.stderr
        started[f"b{i}"] = start_bastion(d, workers=1)
    for i, b in enumerate(started.values(), 1):
        m = Machines(b)
        for j in range(N_MACHINES):
            m.discover(mac(i, j))
    yield started
    for b in started.values():
        b.stop()


# -- enrollment ----------------------------------------------------------------------------------------
def test_join_makes_the_key_on_the_bastion_and_stores_it_0600(labd, admin, tmp_path):
    r = join(labd, admin, tmp_path / "j", "joiner")
    assert r.returncode == 0, r.stderr
    link = tmp_path / "j" / "link"
    assert stat.S_IMODE(link.stat().st_mode) == 0o700
    for f in ("key.pem", "cert.pem", "ca.pem", "identity.json"):
        assert stat.S_IMODE((link / f).stat().st_mode) == 0o600
    meta = json.loads((link / "identity.json").read_text())
    assert meta["hub"] == labd.hub_url and meta["name"] == "joiner"
    key = (link / "key.pem").read_text()
    with db(labd) as c:  # the key never left the bastion: not in any row labd keeps
        dump = json.dumps([list(map(str, r)) for t in ("audit", "certificates", "bastions", "tokens")
                           for r in c.execute(f"SELECT * FROM {t}")])
    assert key.split("\n")[1] not in dump and key.split("\n")[1] not in labd.log()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((link / "cert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN=bastion:{meta['id']},O=bastion"
    ok = [a for a in audit(admin, labd, "bastions.enroll") if a["outcome"] == "allowed"]
    assert any(a["resource"] == f"bastions/{meta['id']}" for a in ok)


def test_join_refusals_each_with_a_clear_message_and_an_audit_row(labd, admin, tmp_path):
    tok = admin.post(labd.url + "/api/v1/tokens", json={"kind": "bastion", "ttl_seconds": 600, "uses": 1}).json()["token"]
    assert bastion_join(labd.url, tok, tmp_path / "a", "reuse-a").returncode == 0
    r = bastion_join(labd.url, tok, tmp_path / "b", "reuse-b")  # replayed
    assert r.returncode != 0 and "join token used up" in r.stderr
    assert not (tmp_path / "b" / "link" / "cert.pem").exists()

    tok = admin.post(labd.url + "/api/v1/tokens", json={"kind": "bastion", "ttl_seconds": 600}).json()
    with db(labd) as c:
        c.execute("UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = %s", (tok["id"],))
    r = bastion_join(labd.url, tok["token"], tmp_path / "c", "expired")
    assert r.returncode != 0 and "join token expired" in r.stderr

    tok = admin.post(labd.url + "/api/v1/tokens", json={"kind": "bastion", "ttl_seconds": 600}).json()
    admin.delete(labd.url + f"/api/v1/tokens/{tok['id']}").raise_for_status()
    r = bastion_join(labd.url, tok["token"], tmp_path / "d", "revoked")
    assert r.returncode != 0 and "join token revoked" in r.stderr

    tok = admin.post(labd.url + "/api/v1/tokens", json={"kind": "agent", "ttl_seconds": 600}).json()["token"]
    r = bastion_join(labd.url, tok, tmp_path / "e", "wrongkind")
    assert r.returncode != 0 and "wrong kind of join token" in r.stderr

    secret = admin.post(labd.url + "/api/v1/tokens", json={"kind": "bastion", "ttl_seconds": 600}).json()["token"]
    wrong_pin = secret.rsplit(":", 1)[0] + ":" + "0" * 64
    before = len(audit(admin, labd, "bastions.enroll"))
    r = bastion_join(labd.url, wrong_pin, tmp_path / "f", "pinned")
    assert r.returncode != 0 and "does not match the join token's pin" in r.stderr
    assert len(audit(admin, labd, "bastions.enroll")) == before  # the token was never sent
    assert not (tmp_path / "f" / "link").exists()
    denied = [a for a in audit(admin, labd, "bastions.enroll") if a["outcome"] == "denied"]
    reasons = {a["detail"]["reason"] for a in denied}
    assert {"join token used up", "join token expired", "join token revoked", "wrong kind of join token"} <= reasons


def test_scoped_token_places_the_bastion(labd, admin, tmp_path):
    r = join(labd, admin, tmp_path / "s", "scoped", scope="lab9/qa/*")
    assert r.returncode == 0, r.stderr
    b = admin.get(labd.url + "/api/v1/bastions/scoped").json()
    assert (b["cloud"], b["environment"], b["status"]) == ("lab9", "qa", "never-connected")
    r = join(labd, admin, tmp_path / "t", "outside", scope="lab9/qa/*", extra=("--cloud", "lab1"))
    assert r.returncode != 0 and "not for lab1/qa/outside" in r.stderr


# -- the link, replication ------------------------------------------------------------------------------
def test_bastions_replicate_machines_and_events_with_their_name(labd, admin, fleet):
    def all_there():
        return len(servers(admin, labd)) >= 3 * N_MACHINES and all(caught_up(labd, b, n) for n, b in fleet.items())
    wait_for(all_there, timeout=60, interval=0.3, what="machines and events of 3 bastions in labd")
    for i, name in enumerate(fleet, 1):
        got = servers(admin, labd, bastion=name)
        assert sorted(s["mac"] for s in got) == sorted(mac(i, j) for j in range(N_MACHINES))
        assert all(s["state"] == "discovered" and s["cloud"] == "lab1" for s in got)
        assert {s["environment"] for s in got} == {"dev" if i < 3 else "prod"}
    bs = {b["name"]: b for b in admin.get(labd.url + "/api/v1/bastions").json()["bastions"]}
    for name in fleet:
        assert bs[name]["status"] == "online" and bs[name]["machines"] == N_MACHINES and bs[name]["lag"] == 0
        assert bs[name]["version"] and bs[name]["last_seen_at"]


def test_routed_install_reaches_the_right_bastion_and_answers_unchanged(labd, admin, fleet):
    wait_for(lambda: len(servers(admin, labd, bastion="b2")) == N_MACHINES, timeout=60, what="b2 replicated")
    target = mac(2, 7)
    body = {"hostname": "routed-1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []}
    r = admin.post(labd.url + f"/api/v1/servers/{target}/install", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "install_queued" and r.json()["hostname"] == "routed-1"
    m = fleet["b2"].session().get(fleet["b2"].url + f"/api/machines/{target}").json()
    assert m["state"] == "install_queued" and m["hostname"] == "routed-1"
    assert [e for e in m["events"] if e["kind"] == "install"][0]["actor"] == "operator@labd"
    for other in ("b1", "b3"):
        assert fleet[other].session().get(fleet[other].url + f"/api/machines/{target}").status_code == 404
    # the bastion's own refusals come back as they are: a 409 (host name taken) and a 422
    r = admin.post(labd.url + f"/api/v1/servers/{mac(2, 8)}/install", json=body)
    assert r.status_code == 409 and "routed-1" in r.json()["error"]
    r = admin.post(labd.url + f"/api/v1/servers/{mac(2, 8)}/install", json={**body, "hostname": "bad name!"})
    assert r.status_code == 422 and r.json()["error"]
    direct = fleet["b2"].session().post(fleet["b2"].url + "/api/install", json={"mac": mac(2, 8), **body, "hostname": "bad name!"})
    assert (direct.status_code, direct.json()) == (r.status_code, r.json())
    # cancel by host name, through labd; the state comes back to labd
    wait_for(lambda: admin.get(labd.url + "/api/v1/servers/routed-1").status_code == 200, timeout=30, what="routed-1 in labd")
    r = admin.post(labd.url + "/api/v1/servers/routed-1/cancel", json={"reason": "changed my mind"})
    assert r.status_code == 200 and r.json()["state"] == "discovered"
    wait_for(lambda: admin.get(labd.url + f"/api/v1/servers/{target}").json()["state"] == "discovered", timeout=30,
             what="the cancel replicated")


def test_a_mac_seen_by_two_bastions_is_a_conflict_that_needs_bastion(labd, admin, fleet):
    shared = mac(1, 3)  # b1 has it; now b3 sees it too
    Machines(fleet["b3"]).discover(shared)
    before = admin.get(labd.url + f"/api/v1/servers/{shared}").json()

    def claimed():
        with db(labd) as c:
            return c.execute("SELECT count(*) FROM server_claims WHERE mac = %s", (shared,)).fetchone()[0] == 2
    wait_for(claimed, timeout=30, what="b3's claim")
    after = admin.get(labd.url + f"/api/v1/servers/{shared}").json()
    assert after["bastion"] == "b1" and after == before  # b3 changed nothing of b1's server
    body = {"hostname": "shared-1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []}
    r = admin.post(labd.url + f"/api/v1/servers/{shared}/install", json=body)
    assert r.status_code == 409 and r.json()["detail"]["bastions"] == ["b1", "b3"]
    r = admin.post(labd.url + f"/api/v1/servers/{shared}/install", json={**body, "bastion": "b3"})
    assert r.status_code == 202
    assert fleet["b3"].session().get(fleet["b3"].url + f"/api/machines/{shared}").json()["state"] == "install_queued"
    assert fleet["b1"].session().get(fleet["b1"].url + f"/api/machines/{shared}").json()["state"] == "discovered"
    time.sleep(1)
    assert admin.get(labd.url + f"/api/v1/servers/{shared}").json()["state"] == "discovered"  # still b1's row


def test_offline_bastion_refuses_commands_unless_queued(labd, admin, fleet):
    b = fleet["b1"]
    b.stop()
    try:
        wait_for(lambda: admin.get(labd.url + "/api/v1/bastions/b1").json()["status"] == "offline", timeout=30,
                 what="b1 offline")
        body = {"hostname": "queued-1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []}
        r = admin.post(labd.url + f"/api/v1/servers/{mac(1, 20)}/install", json=body)
        assert r.status_code == 503 and r.json()["error"].startswith("bastion b1 offline since 20")
        r = admin.post(labd.url + f"/api/v1/servers/{mac(1, 20)}/install", json={**body, "queue": True})
        assert r.status_code == 202 and r.json()["state"] == "install_queued"
        cid = r.json()["command"]
    finally:
        fleet["b1"] = b = start_bastion(b.data_dir, workers=1)
    wait_for(lambda: admin.get(labd.url + f"/api/v1/commands/{cid}").json()["state"] == "done", timeout=30,
             what="the queued command delivered at reconnect")
    assert b.session().get(b.url + f"/api/machines/{mac(1, 20)}").json()["hostname"] == "queued-1"
