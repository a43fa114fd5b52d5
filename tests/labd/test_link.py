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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import (
    Machines,
    bastion_join,
    join_token,
    labctl,
    logged_in,
    serve_labd,
    start_bastion,
    start_labd,
    wait_for,
)
from tests.support import fleet_mac as mac
from tests.support import labd_bastion_join as join
from tests.support import labd_sql as db

N_MACHINES = 300  # per bastion (3 bastions; 10 x 1,000 in bench/labd_fleet.py)
N_DISCOVERED = 50  # the first 50 of each stay discovered for the other tests; the rest are installed


def servers(admin, labd, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        r = admin.get(labd.url + "/api/v1/servers", params={**params, "limit": 500, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        out += r.json()["servers"]
        cursor = r.json()["next"]
        if not cursor:
            return out


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
    yield from serve_labd(postgres, tmp_path_factory, "labd_link")


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def fleet(labd, admin, tmp_path_factory):
    """Three joined bastions (b1, b2, b3), each serving, with 300 machines discovered on each through
    its own API, 250 of them then installed (queued, booted, progress to complete)."""
    root = tmp_path_factory.mktemp("fleet")
    started = {}

    def populate(i, b):
        m = Machines(b)
        for j in range(N_MACHINES):
            m.discover(mac(i, j))
        _install_some(b, i, range(N_DISCOVERED, N_MACHINES), "node")

    try:  # the bastions are stopped even when the setup fails half-way
        for i in (1, 2, 3):
            d = root / f"b{i}"
            r = join(labd, admin, d, f"b{i}", extra=("--cloud", "lab1", "--environment", "dev" if i < 3 else "prod"))
            assert r.returncode == 0, r.stderr
            # 300 machines from one address (this test) in a few seconds: past the per-host discovery limit
            started[f"b{i}"] = start_bastion(d, workers=1, env={"LAB_BASTION_DISCOVER_RATE": "100000",
                                                                 "LAB_BASTION_DISCOVER_BURST": "100000"})
        with ThreadPoolExecutor(3) as pool:  # the three bastions at once, as three sites would
            list(pool.map(lambda ib: populate(*ib), enumerate(started.values(), 1)))
        yield started
    finally:
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
    once = join_token(labd, admin, uses=1)  # a bad CSR is refused without spending the token's use
    r = labd.session().post(labd.url + "/api/v1/enroll", json={"token": once.split(":")[0], "kind": "bastion",
                                                               "name": "badcsr", "csr": "not a CSR"})
    assert r.status_code == 400 and r.json()["error"] == "bad CSR"
    assert bastion_join(labd.url, once, tmp_path / "g", "goodcsr").returncode == 0
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
def test_bastions_replicate_machines_and_events_with_their_name(labd, admin, fleet, tmp_path):
    def all_there():
        return len(servers(admin, labd)) >= 3 * N_MACHINES and all(caught_up(labd, b, n) for n, b in fleet.items())
    wait_for(all_there, timeout=180, interval=0.5, what="machines and events of 3 bastions in labd")
    for i, name in enumerate(fleet, 1):
        got = {s["mac"]: s for s in servers(admin, labd, bastion=name)}
        assert sorted(got) == sorted(mac(i, j) for j in range(N_MACHINES))
        assert all(got[mac(i, j)]["state"] == "discovered" for j in range(N_DISCOVERED))
        assert all((got[mac(i, j)]["state"], got[mac(i, j)]["hostname"]) == ("installed", f"node-{i}-{j}")
                   for j in range(N_DISCOVERED, N_MACHINES))
        assert all(s["cloud"] == "lab1" for s in got.values())
        assert {s["environment"] for s in got.values()} == {"dev" if i < 3 else "prod"}
    # what an operator sees: labctl get servers through labd, selected by bastion and by state
    home = logged_in({"LABCTL_HOME": str(tmp_path / "labctl"), "LABCTL_CONFIG": str(tmp_path / "labctl" / "config.yaml"),
                      "LABCTL_BASTION_URL": "", "LABCTL_TOKEN": "", "LABCTL_OUTPUT": "", "LABCTL_CONTEXT": "", "LABCTL_LABD_URL": ""}, labd)
    for i, name in enumerate(fleet, 1):
        r = labctl(home, "get", "servers", "-l", f"bastion={name}", "--state", "installed", "-o", "json")
        assert r.exit_code == 0, r.output
        assert sorted(x["hostname"] for x in json.loads(r.stdout)["servers"]) == sorted(
            f"node-{i}-{j}" for j in range(N_DISCOVERED, N_MACHINES))
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
        assert r.status_code == 202 and r.json()["state"] == "queued"
        cid = r.json()["command"]
    finally:
        fleet["b1"] = b = start_bastion(b.data_dir, workers=1)
    wait_for(lambda: admin.get(labd.url + f"/api/v1/commands/{cid}").json()["state"] == "done", timeout=30,
             what="the queued command delivered at reconnect")
    assert b.session().get(b.url + f"/api/machines/{mac(1, 20)}").json()["hostname"] == "queued-1"


# -- autonomy and faults -----------------------------------------------------------------------------------
def _install_some(b, i, js, prefix) -> None:
    """Queue, boot and finish installs of machines ``js`` of bastion ``i`` through its own API."""
    m, http = Machines(b), b.session()
    for j in js:
        r = http.post(b.url + "/api/install", json={"mac": mac(i, j), "hostname": f"{prefix}-{i}-{j}", "role": "worker",
                                                    "os": "debian-12", "disk": "", "ssh_keys": []})
        assert r.status_code == 202, r.text
        token = m.boot(mac(i, j))
        m.progress(mac(i, j), token, "partitioning", 10)
        m.progress(mac(i, j), token, "complete", 100)


def test_labd_killed_while_bastions_stream_events_loses_and_repeats_nothing(labd, admin, fleet):
    """kill -9 labd (API, hub and all) while three bastions install a steady stream of machines;
    restart it; every (bastion, event id) is in labd exactly once, and the bastions never stopped."""
    import threading

    errors: list[BaseException] = []
    stop = threading.Event()
    done = {name: 0 for name in fleet}

    def work(i, name):
        b, http = fleet[name], fleet[name].session()
        try:
            k = 0
            while not stop.is_set():  # a steady stream: installs queued and cancelled
                m = mac(i, 30 + k % 15)
                r = http.post(b.url + "/api/install", json={"mac": m, "hostname": f"crash-{i}-{k % 15}", "role": "worker",
                                                            "os": "debian-12", "disk": "", "ssh_keys": []})
                assert r.status_code == 202, r.text
                assert http.post(b.url + f"/api/machines/{m}/cancel", json={}).status_code == 200
                k += 1
            _install_some(b, i, [45], "crash")  # and one install to its end
            done[name] = 45
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(fleet, 1)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    labd.kill()
    at_kill = {name: len(events_on_bastion(b)) for name, b in fleet.items()}
    time.sleep(2.0)  # the bastions keep installing with labd down
    down = {name: len(events_on_bastion(b)) - at_kill[name] for name, b in fleet.items()}
    labd.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(n > 0 for n in down.values()), down  # events were made while labd was down
    for name, b in fleet.items():
        wait_for(lambda b=b, name=name: caught_up(labd, b, name), timeout=90, what=f"{name} caught up")
        got = events_in_labd(labd, name)
        assert len(got) == len(set(got)) == len(events_on_bastion(b))
    with db(labd) as c:
        dup = c.execute("SELECT bastion, event_id, count(*) FROM bastion_events GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
    assert dup == []
    for i, name in enumerate(fleet, 1):
        last = done[name]
        wait_for(lambda i=i, last=last: admin.get(labd.url + f"/api/v1/servers/{mac(i, last)}").json()["state"] == "installed",
                 timeout=30, what="the last install in labd")
        s = admin.get(labd.url + f"/api/v1/servers/{mac(i, last)}").json()
        assert s["hostname"] == f"crash-{i}-{last}" and s["bastion"] == name
        wait_for(lambda name=name: admin.get(labd.url + f"/api/v1/bastions/{name}").json()["status"] == "online",
                 timeout=60, what=f"{name} online")


def test_a_link_killed_in_the_middle_of_a_command_applies_it_once(labd, admin, fleet):
    b = fleet["b2"]
    target = mac(2, 46)
    wait_for(lambda: admin.get(labd.url + f"/api/v1/servers/{target}").status_code == 200, timeout=30, what="replicated")
    link_pid = int(subprocess.run(["pgrep", "-f", "-P", str(b.proc.pid), "bastion_app.link"], capture_output=True,
                                  text=True).stdout.split()[0])
    body = {"hostname": "once-1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": [], "wait_seconds": 60}
    import threading

    answer: dict = {}
    t = threading.Thread(target=lambda: answer.update(r=admin.post(labd.url + f"/api/v1/servers/{target}/install", json=body)))
    t.start()

    def applied():
        with sqlite3.connect(b.data_dir / "state.db") as c:
            return c.execute("SELECT count(*) FROM link_commands").fetchone()[0] > 0 and \
                c.execute("SELECT count(*) FROM events WHERE mac = ? AND kind = 'install'", (target,)).fetchone()[0] > 0
    wait_for(lambda: applied() or "r" in answer, timeout=30, interval=0.005, what="the command applied on the bastion")
    assert "r" not in answer, answer["r"].text
    os.kill(link_pid, signal.SIGKILL)  # the answer may or may not have left: the supervisor restarts the link
    t.join(90)
    r = answer["r"]
    assert r.status_code == 202 and r.json()["hostname"] == "once-1", r.text
    with sqlite3.connect(b.data_dir / "state.db") as c:
        assert c.execute("SELECT count(*) FROM events WHERE mac = ? AND kind = 'install'", (target,)).fetchone()[0] == 1


def test_the_bastion_applies_a_command_id_at_most_once(fleet, tmp_path):
    """The same command delivered twice (a resend after a lost answer): one effect, the same answer."""
    from bastion_app.link import BastionLink
    from labcore import bastion_config

    b = fleet["b3"]
    cfg = bastion_config.load(b.data_dir)
    link = BastionLink(cfg)
    cid = str(uuid.uuid4())
    args = {"mac": mac(3, 47), "hostname": "twice-1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []}
    first = link.apply(cid, "install", args)
    lost = link.apply(cid, "install", args)  # the answer was not stored yet (the link died after the effect)
    assert first[0] == lost[0] == 202 and lost[1]["hostname"] == first[1]["hostname"] == "twice-1"
    link.keep_answer(cid, *first)
    assert link.apply(cid, "install", args) == first
    assert [e["kind"] for e in link.store.events(mac(3, 47))].count("install") == 1
    taken = link.apply(str(uuid.uuid4()), "install", {**args, "mac": mac(3, 48)})  # a new command, another MAC
    assert taken[0] == 409 and "twice-1" in taken[1]["error"]


def test_postgresql_restarted_labd_recovers_without_a_restart(labd, admin, fleet, postgres):
    pid = labd.proc.pid
    postgres.restart()
    wait_for(lambda: admin.get(labd.url + "/readyz").status_code == 200, timeout=30, what="labd ready again")
    Machines(fleet["b1"]).discover(mac(1, 49) .replace(":00:", ":0f:"))
    wait_for(lambda: caught_up(labd, fleet["b1"], "b1"), timeout=60, what="replication again")
    assert admin.get(labd.url + "/api/v1/servers/" + mac(1, 49).replace(":00:", ":0f:")).status_code == 200
    assert labd.proc.pid == pid and labd.proc.poll() is None


# -- security ---------------------------------------------------------------------------------------------
def _link(identity, **kw):
    from labcore import link as linkmod

    return linkmod.Link(identity, kind="bastion", software="test", backoff_cap=0.5, **kw)


def _connect_once(link, seconds=10.0):
    """Run the link until it is welcomed (returns the version) or refused (returns the error)."""
    import asyncio

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            await asyncio.wait_for(link.connected.wait(), seconds)
            return link.version
        except TimeoutError:
            return link.last_error
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    return asyncio.run(go())


def test_versions_current_and_previous_accepted_others_refused(labd, admin, tmp_path):
    assert join(labd, admin, tmp_path / "v", "versions").returncode == 0
    identity = tmp_path / "v" / "link"
    assert _connect_once(_link(identity)) == 2
    assert _connect_once(_link(identity, versions=(1,))) == 1
    err = _connect_once(_link(identity, versions=(0,)), seconds=3)
    assert "no common protocol version" in err
    assert any("no common protocol version" in a["detail"].get("reason", "")
               for a in audit(admin, labd, "bastions.connect"))


def test_revoked_bastion_is_refused_at_its_next_connect(labd, admin, tmp_path):
    assert join(labd, admin, tmp_path / "r", "revokee").returncode == 0
    identity = tmp_path / "r" / "link"
    assert _connect_once(_link(identity)) == 2
    admin.delete(labd.url + "/api/v1/bastions/revokee").raise_for_status()  # labctl delete bastion revokee
    err = _connect_once(_link(identity), seconds=3)
    assert "deleted in labd" in err
    denied = [a for a in audit(admin, labd, "bastions.connect") if a["outcome"] == "denied"]
    assert any("deleted in labd" in a["detail"]["reason"] for a in denied)
    # re-joined with a new token: the old certificate stays refused, the new one works
    assert join(labd, admin, tmp_path / "r2", "revokee").returncode == 0
    assert "revoked" in _connect_once(_link(identity), seconds=3) or "deleted" in _connect_once(_link(identity), seconds=3)
    assert _connect_once(_link(tmp_path / "r2" / "link")) == 2


def test_a_certificate_of_another_ca_does_not_get_through_tls(labd, admin, tmp_path):
    import asyncio
    import ssl

    import websockets

    from labd import tls

    assert join(labd, admin, tmp_path / "o", "other").returncode == 0
    other = tmp_path / "otherca"
    other.mkdir()
    tls.make_ca(other)
    tls.make_server_cert(other)  # a key and a certificate from a CA labd does not know
    ctx = ssl.create_default_context(cafile=str(tmp_path / "o" / "link" / "ca.pem"))
    ctx.load_cert_chain(str(other / "server.crt"), str(other / "server.key"))

    async def go():
        async with websockets.connect(labd.hub_url, ssl=ctx, open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "hello", "versions": [2], "kind": "bastion", "software": "x"}))
            await ws.recv()
    with pytest.raises((ssl.SSLError, websockets.exceptions.WebSocketException, OSError)):
        asyncio.run(go())
    noclient = ssl.create_default_context(cafile=str(tmp_path / "o" / "link" / "ca.pem"))

    async def anonymous():
        async with websockets.connect(labd.hub_url, ssl=noclient, open_timeout=10) as ws:
            await ws.recv()
    with pytest.raises((ssl.SSLError, websockets.exceptions.WebSocketException, OSError)):
        asyncio.run(anonymous())



@pytest.fixture(scope="module")
def short_labd(postgres, tmp_path_factory):
    """A labd whose bastion certificates live 12 seconds."""
    postgres.sql("CREATE DATABASE labd_link_short TEMPLATE labd_template")
    server = start_labd(tmp_path_factory.mktemp("labd-short") / "data", postgres.url("labd_link_short"),
                        env={"LABD_BASTION_CERT_SECONDS": "12"}, workers=1)
    yield server
    server.stop()


def test_certificates_renew_in_band_with_a_new_key(short_labd, tmp_path):
    import asyncio

    from labcore import enroll

    admin = short_labd.session(short_labd.login())
    assert join(short_labd, admin, tmp_path / "renew", "renewer").returncode == 0
    renew_dir = tmp_path / "renew" / "link"
    first_cert, first_key = (renew_dir / "cert.pem").read_bytes(), (renew_dir / "key.pem").read_bytes()
    _, first_end = enroll.cert_times(first_cert)
    link = _link(renew_dir, renew_check_seconds=0.2)

    async def run_until_renewed():
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            for _ in range(200):
                if (renew_dir / "cert.pem").read_bytes() != first_cert:
                    return True
                await asyncio.sleep(0.1)
            return False
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert asyncio.run(run_until_renewed()), "no renewal within 20 s"
    assert (renew_dir / "key.pem").read_bytes() != first_key  # a new key
    assert stat.S_IMODE((renew_dir / "key.pem").stat().st_mode) == 0o600
    _, new_end = enroll.cert_times((renew_dir / "cert.pem").read_bytes())
    assert new_end > first_end
    assert audit(admin, short_labd, "bastions.renew")
    assert _connect_once(_link(renew_dir, versions=(1,))) == 1  # the renewed certificate connects


def test_an_expired_certificate_is_refused_with_a_reason_and_an_audit_row(labd, admin, tmp_path):
    import asyncio
    import ssl

    import websockets

    from labcore import enroll
    from labd import pki

    assert join(labd, admin, tmp_path / "x", "expirer").returncode == 0
    d = tmp_path / "x" / "link"
    peer = json.loads((d / "identity.json").read_text())["id"]
    key, csr = enroll.new_key_and_csr("x")  # a certificate of labd's CA that lived one second
    cert, fp, not_after = pki.sign(labd.data_dir, pki.load_csr(csr.decode()), "bastion", peer, 1)
    with db(labd) as c:
        pki.record(c.cursor(), fp, "bastion", peer, not_after)
    enroll.store_identity(d, key, cert, (d / "ca.pem").read_bytes())
    wait_for(lambda: time.time() > not_after.timestamp() + 0.5, timeout=10, what="expiry")
    assert "our certificate expired" in _connect_once(_link(d), seconds=3)
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))

    async def raw():  # past the client's own check: the hub refuses it
        async with websockets.connect(labd.hub_url, ssl=ctx, open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "hello", "versions": [2, 1], "kind": "bastion", "software": "x"}))
            try:
                await ws.recv()
            except websockets.ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason
    code, reason = asyncio.run(raw())
    assert code == 4001 and "certificate expired at" in reason
    denied = [a for a in audit(admin, labd, "bastions.connect") if a["outcome"] == "denied"]
    assert any("certificate expired at" in a["detail"]["reason"] for a in denied)


def test_a_bastion_cannot_change_another_bastions_machines(labd, admin, fleet, tmp_path):
    """A joined bastion (its own certificate) sends rows and tombstones for b1's MACs, and tries to
    answer a command meant for b1: b1's servers and the command are unchanged."""
    import asyncio

    import websockets

    assert join(labd, admin, tmp_path / "m", "mallory").returncode == 0
    identity = tmp_path / "m" / "link"
    victim = mac(1, 5)
    wait_for(lambda: admin.get(labd.url + f"/api/v1/servers/{victim}").status_code == 200, timeout=30, what="b1's row")
    before = admin.get(labd.url + f"/api/v1/servers/{victim}").json()
    with db(labd) as c:
        b1 = c.execute("SELECT id FROM bastions WHERE name = 'b1'").fetchone()[0]
        cid = c.execute("INSERT INTO commands (target_kind, target_id, kind, args, state, created_by) VALUES "
                        "('bastion', %s, 'forget', '{}', 'sent', 'test') RETURNING id", (str(b1),)).fetchone()[0]
    from labcore import link as linkmod

    forged = {**before, "state": "installed", "hostname": "stolen", "bastion": "mallory", "change": 10 ** 9}

    async def go():
        async with websockets.connect(labd.hub_url, ssl=linkmod.ssl_context(identity), open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "hello", "versions": [2], "kind": "bastion", "software": "x"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "replicate", "machines": [forged], "events": [],
                                      "deleted": [{"mac": mac(1, 6), "change": 10 ** 9}], "head": {}}))
            ack = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "result", "id": str(cid), "status": 200, "body": {"forged": True}}))
            await ws.send(json.dumps({"type": "hello", "kind": "bastion", "versions": [2], "bastion": "b1"}))
            await asyncio.sleep(0.5)
            return ack
    ack = asyncio.run(go())
    assert ack["type"] == "ack"
    after = admin.get(labd.url + f"/api/v1/servers/{victim}").json()
    assert {k: after[k] for k in ("state", "hostname", "bastion")} == {k: before[k] for k in ("state", "hostname", "bastion")}
    assert admin.get(labd.url + f"/api/v1/servers/{mac(1, 6)}").json()["bastion"] == "b1"
    with db(labd) as c:
        assert c.execute("SELECT state, result FROM commands WHERE id = %s", (cid,)).fetchone() == ("sent", None)
        c.execute("UPDATE commands SET state = 'cancelled' WHERE id = %s", (cid,))


def test_labctl_provision_commands_route_through_labd(labd, admin, fleet, monkeypatch):
    """labctl's routed path (labctl/routed.py) against the real labd: the answer of the bastion,
    its refusals as labctl errors, --bastion for a conflict."""
    from types import SimpleNamespace

    from labctl import errors, routed
    from labctl.client import Client

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", labd.ca)
    obj = SimpleNamespace(uses_labd=True, labd=Client(labd.url, admin.headers["Authorization"][7:]), output="json")
    assert routed.check(obj, None, False)
    out = routed.send(obj, mac(3, 10), "debug", {"mode": "rescue"}, None, False)
    assert out["debug"] == "rescue" and out["mac"] == mac(3, 10)
    with pytest.raises(errors.Conflict):  # b1 and b3 both see it (the conflict test above)
        routed.send(obj, mac(1, 3), "debug", {"mode": "rescue"}, None, False)
    assert routed.send(obj, mac(1, 3), "debug", {"mode": "pxe"}, "b1", False)["debug"] == "pxe"
    with pytest.raises(errors.NotFound):
        routed.send(obj, "52:54:ff:ff:ff:ff", "forget", {}, None, False)
    with pytest.raises(errors.UsageError):
        routed.check(SimpleNamespace(uses_labd=False), "b1", False)
