"""lab-agent against a real labd (gunicorn API + the hub, HTTPS and mTLS with labd's own CA, on a
real PostgreSQL), agents as real `lab-agent` subprocesses: join (scoped: active at once; reusable:
pending until approved), heartbeat, exec (interleaved output, exit codes, timeout, cancel, nothing
left running), journal follow across a labd restart, certificate renewal, revocation, and the
security properties (identity = certificate; no reach into another agent's commands; 403 + audit
without `exec`; no secret in any log)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from labcore import enroll
from labctl import agent_cmd
from labctl.client import Client
from tests.support import (
    REPO,
    fake_journal,
    join_token,
    journal_append,
    lab_agent_cli,
    pids_with,
    serve_labd,
    start_agent,
    wait_for,
)

pytestmark = pytest.mark.slow
CERT_SECONDS = 24  # renewal at about 16 s (2/3), so the renewal test sees one within its run


@pytest.fixture(scope="module")
def labd(postgres, tmp_path_factory):
    yield from serve_labd(postgres, tmp_path_factory, "labd_agents", env={
        "LABD_AGENT_HEARTBEAT_SECONDS": "1", "LABD_AGENT_MISSED_BEATS": "3", "LABD_AGENT_CERT_SECONDS": str(CERT_SECONDS)})


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def journal_files(tmp_path_factory):
    return fake_journal(tmp_path_factory.mktemp("journal"))


def db(labd, sql, params=()):
    with psycopg.connect(labd.database_url, row_factory=dict_row, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def agent_token(labd, admin, *, scope: str, uses: int | None = 1) -> str:
    join = join_token(labd, admin, uses=uses, scope=scope, kind="agent")
    assert enroll.parse_join(join)[1] == enroll.fingerprint(open(labd.ca, "rb").read())  # it pins labd's CA
    return join


def join(labd, state_dir, token, name):
    r = lab_agent_cli("join", "--labd", labd.url, "--state-dir", str(state_dir), "--name", name, env={"LAB_AGENT_TOKEN": token})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def agent_row(admin, labd, host):
    r = admin.get(f"{labd.url}/api/v1/agents/{host}")
    assert r.status_code == 200, r.text
    return r.json()


def client(labd, token) -> Client:
    c = Client(labd.url, token, labd=True, verify=labd.ca)
    c.session.trust_env = False
    return c


def run_exec(c: Client, host: str, argv: list[str], timeout: float | None = None) -> tuple[int, str, str, dict]:
    made = c.post(f"/api/v1/agents/{host}/exec", {"argv": argv, **({"timeout": timeout} if timeout else {})})
    out, err = io.StringIO(), io.StringIO()
    final = agent_cmd.follow(c, made["id"], out, err, deadline=time.monotonic() + 60, poll=0.05)
    return agent_cmd.exit_code(final), out.getvalue(), err.getvalue(), final


@pytest.fixture(scope="module")
def host_a(labd, admin, tmp_path_factory, journal_files):
    """An agent joined with a token scoped to its machine (accepted at once), running."""
    bindir, jfile = journal_files
    state = tmp_path_factory.mktemp("agent-a") / "state"
    token = agent_token(labd, admin, scope="lab1/dev/host-a")
    out = join(labd, state, token, "host-a")
    assert "(active)" in out.stdout
    agent = start_agent(state, "--exec-user", "nobody", "--renew-check-seconds", "1", "--backoff-cap", "1",
                        "--journalctl", str(bindir / "journalctl"), env={"FAKE_JOURNAL": str(jfile)})
    wait_for(lambda: agent_row(admin, labd, "host-a").get("facts"), timeout=20, what="host-a's first heartbeat")
    yield {"agent": agent, "state": state, "token": token}
    agent.stop()


def test_join_scoped_active_heartbeat_and_identity_files(labd, admin, host_a):
    row = agent_row(admin, labd, "host-a")
    assert row["status"] == "active" and row["cloud"] == "lab1" and row["environment"] == "dev"
    f = row["facts"]
    assert f["hostname"] and f["uptime_seconds"] > 0 and len(f["load"]) == 3 and f["memory_total_bytes"] > 0 and f["os"]
    assert row["version"]
    state = host_a["state"]
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    for name in ("key.pem", "cert.pem", "ca.pem", "identity.json"):
        assert oct((state / name).stat().st_mode & 0o777) == "0o600"
    assert enroll.cert_subject((state / "cert.pem").read_bytes()) == f"agent:{row['id']}"
    # the key never left the host: labd's database and logs hold no private key
    key_body = (state / "key.pem").read_text().splitlines()[1]
    assert key_body not in labd.log() and key_body not in json.dumps(db(labd, "SELECT * FROM certificates"), default=str)
    # a scoped token is used up
    r = lab_agent_cli("join", "--labd", labd.url, "--state-dir", str(state.parent / "again"), "--name", "host-a",
                      env={"LAB_AGENT_TOKEN": host_a["token"]})
    assert r.returncode != 0 and "used up" in r.stderr


def test_heartbeats_are_batched(labd, admin, host_a):
    """host-a beats every second; its row is written on the hub's beat (every 5 s), not per heartbeat."""
    seen, facts = set(), set()
    end = time.monotonic() + 11
    while time.monotonic() < end:
        row = db(labd, "SELECT last_seen_at, facts FROM agents WHERE hostname = 'host-a'")[0]
        seen.add(row["last_seen_at"])
        facts.add(json.dumps(row["facts"], sort_keys=True))
        time.sleep(0.2)
    assert 2 <= len(seen) <= 4 and len(facts) <= 4  # refreshed, but ~11 beats made at most 4 writes


def test_exec_interleaves_output_and_returns_the_exit_code(labd, admin, host_a):
    c = client(labd, labd.login())
    script = ("import sys,time\nfor i in range(6):\n    s = sys.stdout if i % 2 == 0 else sys.stderr\n"
              "    s.write(f'line {i}\\n'); s.flush(); time.sleep(0.1)\nsys.exit(7)")
    code, out, err, final = run_exec(c, "host-a", ["python3", "-c", script])
    assert final["result"].get("error") is None, final
    assert code == 7 and out == "line 0\nline 2\nline 4\n" and err == "line 1\nline 3\nline 5\n"
    rows = db(labd, "SELECT seq, stream, data FROM command_output WHERE command_id = %s ORDER BY seq", (final["id"],))
    assert [(r["stream"], r["data"]) for r in rows] == [("stdout" if i % 2 == 0 else "stderr", f"line {i}\n") for i in range(6)]
    code, out, _, final = run_exec(c, "host-a", ["id", "-un"])
    assert code == 0 and out == "nobody\n" and final["result"]["user"] == "nobody"
    audit = db(labd, "SELECT actor, action, detail FROM audit WHERE resource = %s ORDER BY ts", (f"commands/{final['id']}",))
    assert [a["action"] for a in audit] == ["agents.exec", "agents.exec.result"]
    assert audit[0]["actor"] == "admin" and audit[0]["detail"]["argv"] == ["id", "-un"]
    assert audit[1]["detail"]["exit_code"] == 0 and audit[1]["detail"]["user"] == "nobody"
    assert "nobody\n" not in json.dumps([a["detail"] for a in audit])  # never the output


def test_exec_timeout_and_cancel_leave_nothing_running(labd, admin, host_a):
    c = client(labd, labd.login())
    marker = f"agent-e2e-{os.getpid()}"
    t0 = time.monotonic()
    code, out, _, final = run_exec(c, "host-a", ["bash", "-c", f"echo go; exec -a {marker}-t sleep 300"], timeout=1)
    assert code == agent_cmd.TIMEOUT_EXIT and out == "go\n" and final["result"]["timed_out"] and time.monotonic() - t0 < 15
    assert pids_with(f"{marker}-t") == []
    made = c.post("/api/v1/agents/host-a/exec", {"argv": ["bash", "-c", f"exec -a {marker}-c sleep 300"]})
    wait_for(lambda: pids_with(f"{marker}-c"), timeout=15, what="the remote command to start")
    c.post(f"/api/v1/commands/{made['id']}/cancel")
    final = wait_for(lambda: (x := c.get(f"/api/v1/commands/{made['id']}"))["result"] and x, timeout=15, what="the cancel")
    assert final["state"] == "cancelled" and agent_cmd.exit_code(final) == 130
    wait_for(lambda: pids_with(f"{marker}-c") == [], timeout=5, what="the cancelled process to go")


def test_exec_offline_pending_and_permission(labd, admin, host_a, tmp_path):
    # a reusable token: pending until approved; no command for a pending agent
    state = tmp_path / "b"
    out = join(labd, state, agent_token(labd, admin, scope="*", uses=None), "host-b")
    assert "(pending)" in out.stdout
    r = admin.post(labd.url + "/api/v1/agents/host-b/exec", json={"argv": ["true"]})
    assert r.status_code == 409 and "pending" in r.json()["error"]
    r = admin.post(labd.url + "/api/v1/agents/host-b/approve")
    assert r.status_code == 200 and r.json()["status"] == "active"
    # approved but never connected: fails at once, saying when it was last seen
    t0 = time.monotonic()
    r = admin.post(labd.url + "/api/v1/agents/host-b/exec", json={"argv": ["true"]})
    assert r.status_code == 409 and r.json()["detail"] == "last seen: never" and time.monotonic() - t0 < 2
    # a viewer may read the agent but not run commands: 403 and an audit row
    admin.post(labd.url + "/api/v1/users", json={"name": "vera", "password": "a-long-password-1"}).raise_for_status()
    admin.post(labd.url + "/api/v1/rolebindings", json={"user": "vera", "role": "viewer"}).raise_for_status()
    vera = labd.session(labd.login("vera", "a-long-password-1"))
    assert vera.get(labd.url + "/api/v1/agents/host-a").status_code == 200
    r = vera.post(labd.url + "/api/v1/agents/host-a/exec", json={"argv": ["id"]})
    assert r.status_code == 403
    rows = db(labd, "SELECT actor, status, outcome FROM audit WHERE actor = 'vera' AND status = 403")
    assert rows and rows[-1]["outcome"] == "denied"
    assert vera.post(labd.url + "/api/v1/agents/host-a/logs", json={}).status_code == 403


def test_journal_follow_resumes_after_a_labd_restart(labd, admin, host_a, journal_files):
    _, jfile = journal_files
    c = client(labd, labd.login())
    for i in range(3):
        journal_append(jfile, i, f"before {i}")
    made = c.post("/api/v1/agents/host-a/logs", {"unit": "demo.service", "follow": True})

    def messages():
        rows = db(labd, "SELECT seq, data FROM command_output WHERE command_id = %s ORDER BY seq", (made["id"],))
        return [r["data"]["message"] for r in rows], [r["seq"] for r in rows]

    wait_for(lambda: len(messages()[0]) == 3, timeout=15, what="the first entries")
    labd.kill()  # a crash: the agent's link drops
    for i in range(3, 6):
        journal_append(jfile, i, f"during {i}")
    labd.start()
    journal_append(jfile, 6, "after 6")
    wait_for(lambda: len(messages()[0]) >= 7, timeout=40, what="the follow to resume")
    time.sleep(1)
    msgs, seqs = messages()
    assert msgs == ["before 0", "before 1", "before 2", "during 3", "during 4", "during 5", "after 6"]
    assert seqs == list(range(1, 8))
    argvs = [json.loads(line) for line in open(str(jfile) + ".argv")]
    assert any("--cursor" in a for a in argvs)  # resumed by cursor, not re-read
    # the same through labctl's follow, then Ctrl-C's cancel ends it
    c.post(f"/api/v1/commands/{made['id']}/cancel")
    wait_for(lambda: c.get(f"/api/v1/commands/{made['id']}")["state"] == "cancelled", timeout=10, what="cancel")


def test_certificate_renewed_with_a_new_key(labd, admin, host_a):
    state = host_a["state"]
    key0, cert0 = (state / "key.pem").read_bytes(), (state / "cert.pem").read_bytes()
    wait_for(lambda: (state / "cert.pem").read_bytes() != cert0, timeout=CERT_SECONDS, interval=0.5, what="a renewal")
    assert (state / "key.pem").read_bytes() != key0
    aid = agent_row(admin, labd, "host-a")["id"]
    assert len(db(labd, "SELECT * FROM certificates WHERE peer_kind = 'agent' AND peer_id = %s", (aid,))) >= 2
    # the link stays usable (a reconnect uses the new certificate)
    c = client(labd, labd.login())
    assert run_exec(c, "host-a", ["true"])[0] == 0


def test_an_agent_cannot_act_as_another(labd, admin, host_a, tmp_path):
    """Agent C (its own valid certificate) answers host-a's command and writes output for it: no effect."""
    state_c = tmp_path / "c"
    join(labd, state_c, agent_token(labd, admin, scope="lab1/dev/host-c"), "host-c")
    c = client(labd, labd.login())
    made = c.post("/api/v1/agents/host-a/exec", {"argv": ["sleep", "3"]})
    meta = enroll.load_meta(state_c)

    async def impostor():
        import websockets

        ctx = ssl.create_default_context(cafile=str(state_c / "ca.pem"))
        ctx.load_cert_chain(str(state_c / "cert.pem"), str(state_c / "key.pem"))
        async with websockets.connect(meta["hub"], ssl=ctx) as ws:
            await ws.send(json.dumps({"type": "hello", "versions": [2, 1], "kind": "agent", "software": "x"}))
            welcome = json.loads(await ws.recv())
            assert welcome["id"] == meta["id"]  # its identity is its certificate's
            await ws.send(json.dumps({"type": "output", "id": made["id"], "seq": 99, "stream": "stdout", "data": "forged\n"}))
            await ws.send(json.dumps({"type": "result", "id": made["id"], "status": "done", "body": {"exit_code": 0}}))
            await asyncio.sleep(1)

    asyncio.run(impostor())
    final = wait_for(lambda: (x := c.get(f"/api/v1/commands/{made['id']}"))["state"] == "done" and x, timeout=20, what="done")
    assert all(r["data"] != "forged\n" for r in final["output"]) and final["result"]["exit_code"] == 0
    assert not db(labd, "SELECT 1 FROM command_output WHERE command_id = %s AND seq = 99", (made["id"],))


def test_revoke_closes_the_link_and_refuses_it(labd, admin, tmp_path):
    state = tmp_path / "d"
    join(labd, state, agent_token(labd, admin, scope="lab1/dev/host-d"), "host-d")
    agent = start_agent(state, "--backoff-cap", "1")
    try:
        wait_for(lambda: agent_row(admin, labd, "host-d").get("facts"), timeout=20, what="host-d's heartbeat")
        r = admin.post(labd.url + "/api/v1/agents/host-d/revoke")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert agent.proc.wait(30) == 78  # closed by the hub, refused on reconnect: the agent gives up (no restart)
        assert "revoked" in agent.log()
        r = admin.post(labd.url + "/api/v1/agents/host-d/exec", json={"argv": ["true"]})
        assert r.status_code == 409
        assert db(labd, "SELECT 1 FROM audit WHERE action = 'agents.revoke'")
    finally:
        agent.stop()


def test_offline_when_the_agent_stops_and_no_secret_in_logs(labd, admin, host_a, tmp_path):
    state = tmp_path / "e"
    token = agent_token(labd, admin, scope="lab1/dev/host-e")
    join(labd, state, token, "host-e")
    agent = start_agent(state, "--backoff-cap", "1")
    wait_for(lambda: agent_row(admin, labd, "host-e").get("facts"), timeout=20, what="host-e's heartbeat")
    agent.stop()
    wait_for(lambda: agent_row(admin, labd, "host-e")["status"] == "offline", timeout=10, what="offline")
    r = admin.post(labd.url + "/api/v1/agents/host-e/exec", json={"argv": ["true"]})
    assert r.status_code == 409 and r.json()["detail"].startswith("last seen: 20")
    secret = token.split(":")[0]
    key_line = (state / "key.pem").read_text().splitlines()[1]
    for text in (labd.log(), agent.log(), host_a["agent"].log(),
                 json.dumps(db(labd, "SELECT * FROM audit"), default=str)):
        assert secret not in text and key_line not in text


def test_ctrl_c_in_labctl_kills_the_remote_process(labd, admin, host_a, tmp_path):
    """labctl's follow loop in a process of its own gets SIGINT (Ctrl-C): it cancels the command and
    the agent kills the remote process group."""
    marker = f"agent-ctrlc-{os.getpid()}"
    script = tmp_path / "exec.py"
    script.write_text(
        "import sys\nfrom labctl import agent_cmd\nfrom labctl.client import Client\n"
        f"c = Client({labd.url!r}, sys.stdin.readline().strip(), labd=True, verify={labd.ca!r})\nc.session.trust_env = False\n"
        f"made = c.post('/api/v1/agents/host-a/exec', {{'argv': ['bash', '-c', 'echo started; exec -a {marker} sleep 300']}})\n"
        "print(made['id'], flush=True)\n"
        "try:\n    agent_cmd.follow(c, made['id'], sys.stdout, sys.stderr)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdin.write(labd.login() + "\n")
    proc.stdin.flush()
    cid = proc.stdout.readline().strip()
    wait_for(lambda: pids_with(marker), timeout=15, what="the remote command to start")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    wait_for(lambda: pids_with(marker) == [], timeout=10, what="the remote process to be killed")
    c = client(labd, labd.login())
    wait_for(lambda: c.get(f"/api/v1/commands/{cid}")["state"] == "cancelled", timeout=10, what="cancelled")
