"""lab-agent on the machines a bastion installs (issue 18, item 6), with real processes: PostgreSQL,
`labd serve` (API + hub), `lab-bastion join` + `lab-bastion serve` (its link asks labd for a join
token scoped to each machine it installs), the install script as the bastion serves it, the join
step the installed machine runs (POST /api/agent-join with the install's token, then `lab-agent
join` with what it answered), and `labctl`-visible results through labd's API. The QEMU run of
the same chain is tests/e2e/test_image_deploy.py."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from bastion_app.agent_install import REQUIREMENTS, WHEELS_PATH
from tests.support import (
    bastion_join,
    call_from,
    installing,
    join_token,
    lab_agent_cli,
    start_bastion,
    start_labd,
    wait_for,
)

pytestmark = pytest.mark.slow
WHEELS = ("lab_platform-0.1.0-py3-none-any.whl", "pip-23.2.1-py3-none-any.whl", "click-8.1.7-py3-none-any.whl")


@pytest.fixture(scope="module")
def labd(postgres, tmp_path_factory):
    postgres.sql("CREATE DATABASE labd_install_agent TEMPLATE labd_template")
    server = start_labd(tmp_path_factory.mktemp("labd-ia") / "data", postgres.url("labd_install_agent"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def bastion(labd, admin, tmp_path_factory):
    """A bastion joined to labd (cloud lab1, environment dev) that serves agent wheels."""
    d = tmp_path_factory.mktemp("ia") / "b"
    r = bastion_join(labd.url, join_token(labd, admin), d, "b-ia", "--cloud", "lab1", "--environment", "dev")
    assert r.returncode == 0, r.stderr
    wheels = d / "images" / WHEELS_PATH
    wheels.mkdir(parents=True)
    for name in WHEELS:
        (wheels / name).write_bytes(b"PK")
    b = start_bastion(d, workers=1)
    yield b
    b.stop()


def agent_token_row(b, mac: str):
    with sqlite3.connect(b.data_dir / "state.db") as c:
        return c.execute("SELECT install_token, token, error FROM agent_tokens WHERE mac = ?", (mac,)).fetchone()


def labd_db(labd, sql, params=()):
    with psycopg.connect(labd.database_url, row_factory=dict_row, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def agent_join_env(b, mac: str, install_token: str, source: str) -> tuple[int, str]:
    return call_from(b, source, "POST", "/api/agent-join", {"mac": mac, "token": install_token})


def test_an_install_carries_a_join_token_scoped_to_the_machine_and_its_agent_enrolls_by_itself(labd, admin, bastion,
                                                                                               tmp_path):
    mac, host, source = "52:54:00:1a:00:01", "ia-node-1", "127.0.0.21"
    install_token = installing(bastion, mac, host, os_name="debian-12", source=source)
    wait_for(lambda: (agent_token_row(bastion, mac) or (None, None))[1], timeout=20, what="labd's join token on the bastion")
    stored_install, token, _ = agent_token_row(bastion, mac)
    assert stored_install == install_token

    # labd made it: kind agent, scoped to this machine, one use, a short life; audited as the bastion's
    row = labd_db(labd, "SELECT kind, scope, uses_left, expires_at - created_at AS ttl, created_by FROM tokens "
                        "WHERE created_by LIKE 'bastion:%%' ORDER BY created_at DESC LIMIT 1")[0]
    assert (row["kind"], row["scope"], row["uses_left"]) == ("agent", f"lab1/dev/{host}", 1)
    assert row["ttl"].total_seconds() <= 4 * 3600 + 5
    audit = admin.get(labd.url + "/api/v1/audit", params={"action": "tokens.create", "limit": 500}).json()["audit"]
    assert any(a["resource"] == f"servers/{mac}" and a["actor"] == row["created_by"] for a in audit)

    # the install script installs the agent but does not carry the token (it asks for it with the install's own token)
    st, script = call_from(bastion, source, "GET", f"/install.sh?mac={mac}&token={install_token}")
    assert st == 200, script
    assert "lab-agent" in script and "/api/agent-join" in script and token not in script
    for wheel in WHEELS:
        assert f"/images/{WHEELS_PATH}/{wheel}" in script
    assert " ".join(REQUIREMENTS) in script.replace("'", "")
    assert "NoNewPrivileges=yes" in script and "ProtectSystem=strict" in script  # roles/lab_agent's unit
    assert f"--name {host}" in script

    # only this install gets it: another address, a wrong install token
    assert agent_join_env(bastion, mac, install_token, "127.0.0.22")[0] == 403
    assert agent_join_env(bastion, mac, "x" * len(install_token), source)[0] == 403
    st, env_text = agent_join_env(bastion, mac, install_token, source)
    assert st == 200, env_text
    env = dict(line.split("=", 1) for line in env_text.splitlines())
    assert env == {"LAB_AGENT_LABD": labd.url, "LAB_AGENT_TOKEN": token}
    assert token not in bastion.log()

    # what the installed machine's unit does at its first start: join with it; accepted at once (scoped)
    state = tmp_path / "agent"
    r = lab_agent_cli("join", "--state-dir", str(state), "--name", host, env=env)
    assert r.returncode == 0, r.stderr
    assert "(active)" in r.stdout
    r = admin.get(f"{labd.url}/api/v1/agents/{host}")
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    # one use: replayed, refused
    r = lab_agent_cli("join", "--state-dir", str(tmp_path / "again"), "--name", host, env=env)
    assert r.returncode != 0 and "used up" in r.stderr
    assert token not in labd.log()


def test_labd_down_while_queueing_the_token_comes_when_it_is_back(labd, admin, bastion):
    mac, host, source = "52:54:00:1a:00:02", "ia-node-2", "127.0.0.23"
    labd.stop()
    try:
        install_token = installing(bastion, mac, host, os_name="debian-12", source=source)
        st, script = call_from(bastion, source, "GET", f"/install.sh?mac={mac}&token={install_token}")
        assert st == 200 and "/api/agent-join" not in script  # no token yet: the install goes on without the agent
        assert agent_join_env(bastion, mac, install_token, source)[0] == 404
    finally:
        labd.start()
    wait_for(lambda: (agent_token_row(bastion, mac) or (None, None))[1], timeout=60, what="the join token after labd is back")
    st, script = call_from(bastion, source, "GET", f"/install.sh?mac={mac}&token={install_token}")
    assert st == 200 and "/api/agent-join" in script


def test_the_token_goes_with_the_install(labd, admin, bastion):
    mac, host, source = "52:54:00:1a:00:03", "ia-node-3", "127.0.0.24"
    installing(bastion, mac, host, os_name="debian-12", source=source)
    wait_for(lambda: (agent_token_row(bastion, mac) or (None, None))[1], timeout=20, what="the join token")
    r = requests.post(f"{bastion.url}/api/machines/{mac}/cancel", headers=bastion.headers, json={}, timeout=10)
    assert r.status_code == 200, r.text
    assert agent_token_row(bastion, mac) is None  # cancelled: the bastion forgets it


def test_a_bastion_not_joined_installs_as_before(tmp_path):
    d = tmp_path / "plain"
    wheels = d / "images" / WHEELS_PATH
    wheels.mkdir(parents=True)
    for name in WHEELS:
        (wheels / name).write_bytes(b"PK")
    b = start_bastion(d, workers=1)
    try:
        mac, source = "52:54:00:1a:00:04", "127.0.0.25"
        install_token = installing(b, mac, "ia-plain", os_name="debian-12", source=source)
        st, script = call_from(b, source, "GET", f"/install.sh?mac={mac}&token={install_token}")
        assert st == 200 and "lab-agent" not in script
        st, body = agent_join_env(b, mac, install_token, source)
        assert st == 404 and "not enrolled" in body
    finally:
        b.stop()
