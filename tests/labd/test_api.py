"""labd's commands and API against a real PostgreSQL and a real `labd serve`: init (once, 0700
data directory, the one-time password), the configuration's precedence, servers' filters and pages,
SQL injection attempts in every filter, kubeconfigs sealed at rest, tokens that expire and are
revoked."""

from __future__ import annotations

import os
import stat

import psycopg
import pytest

from labd import config as configmod
from tests.support import labd_cli

INJECTIONS = ["' OR '1'='1", "x'; DROP TABLE servers; --", "lab1' UNION SELECT * FROM users --", "%", "_", "*",
              "\\", "lab1/*", "'||(SELECT password_hash FROM users LIMIT 1)||'", "1; SELECT pg_sleep(5)"]


def test_init_makes_a_private_data_dir_and_refuses_twice(labd_db, tmp_path):
    d = tmp_path / "d"
    r = labd_cli("init", "--data-dir", str(d), "--database-url", labd_db)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("admin password: ")]
    assert len(lines) == 1 and len(lines[0].split(": ")[1]) >= 20
    assert "sha256:" in r.stderr  # the CA fingerprint, to compare with labctl login's
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "secret.key", "labd.yaml"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    again = labd_cli("init", "--data-dir", str(d))  # the URL from labd.yaml
    assert again.returncode == 1 and "initialised already" in again.stderr and "password" not in again.stdout
    forced = labd_cli("init", "--data-dir", str(d), "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("admin password: ") and forced.stdout != r.stdout
    assert "up to date" in labd_cli("migrate", "--data-dir", str(d)).stdout


def test_the_database_url_flag_beats_env_beats_file(tmp_path):
    (tmp_path / "labd.yaml").write_text("database_url: postgresql:///file\nlisten: 0.0.0.0:9443\n")
    assert configmod.load(tmp_path, env={}).database_url == "postgresql:///file"
    env = {"LABD_DATABASE_URL": "postgresql:///env"}
    assert configmod.load(tmp_path, env=env).database_url == "postgresql:///env"
    assert configmod.load(tmp_path, env=env, database_url="postgresql:///flag").database_url == "postgresql:///flag"
    assert configmod.load(tmp_path, env={}).listen == "0.0.0.0:9443"
    (tmp_path / "labd.yaml").write_text("databse_url: x\n")
    with pytest.raises(configmod.ConfigError, match="unknown setting"):
        configmod.load(tmp_path, env={})
    r = labd_cli("migrate", "--data-dir", str(tmp_path / "empty"), env={"LABD_DATABASE_URL": ""})
    assert r.returncode == 1 and "no database URL" in r.stderr


def test_public_endpoints(labd):
    import requests

    s = labd.session()
    with pytest.raises(requests.ConnectionError):  # HTTPS only: plain HTTP gets no answer
        requests.get(labd.url.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):  # labd's own CA, not one the system trusts
        requests.get(labd.url + "/healthz", timeout=5, verify=True)
    assert s.get(labd.url + "/healthz").json() == {"status": "ok"}
    assert s.get(labd.url + "/readyz").json() == {"status": "ready"}
    assert s.get(labd.url + "/api/v1/whoami").status_code == 401
    metrics = s.get(labd.url + "/metrics").text
    assert "labd_requests_total" in metrics and "labd_denied_total" in metrics
    ca = s.get(labd.url + "/api/v1/ca")
    assert ca.headers["Content-Type"].startswith("text/plain") and ca.text == open(labd.ca).read()
    doc = s.get(labd.url + "/api/openapi.json").json()
    assert "/api/v1/servers" in doc["paths"] and "ServerView" in doc["components"]["schemas"]


def test_servers_filters_and_pages(labd, admin):
    u = labd.url + "/api/v1/servers"
    made = []
    for i in range(7):
        r = admin.post(u, json={"mac": f"52:54:03:00:00:{i:02x}", "cloud": "pg", "environment": "e" + str(i % 2),
                                "bastion": "b1" if i < 3 else "b2", "hostname": f"pg-node{i}",
                                "labels": {"tier": "web" if i % 3 == 0 else "db", "zone": "a"}})
        assert r.status_code == 201, r.text
        made.append(r.json())
    got = admin.get(u, params={"cloud": "pg", "environment": "e0", "label": ["tier=web", "zone=a"]}).json()["servers"]
    assert sorted(s["hostname"] for s in got) == ["pg-node0", "pg-node6"]
    assert {s["hostname"] for s in admin.get(u, params={"cloud": "pg", "bastion": "b1"}).json()["servers"]} == \
        {"pg-node0", "pg-node1", "pg-node2"}
    seen, cursor = [], None
    while True:
        page = admin.get(u, params={"cloud": "pg", "limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [s["mac"] for s in page["servers"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == sorted(s["mac"] for s in made)
    # one server by id, MAC (any spelling) or host name
    one = made[0]
    for ref in (one["id"], one["mac"], one["mac"].replace(":", "-").upper(), one["hostname"]):
        assert admin.get(f"{u}/{ref}").json()["id"] == one["id"]
    assert set(one) >= {"mac", "state", "hostname", "role", "os", "disk", "ssh_keys", "ip", "hardware", "stage", "percent",
                        "installed_at", "id", "bastion", "cloud", "environment", "labels"}
    assert admin.post(u, json={"mac": one["mac"], "cloud": "pg", "environment": "e0"}).status_code == 409
    assert admin.patch(f"{u}/{one['id']}", json={"cloud": None}).status_code == 422


def test_sql_injection_in_every_filter_is_inert(labd, admin):
    before = admin.get(labd.url + "/api/v1/servers", params={"limit": 1000}).json()["servers"]
    filters = {"servers": ["cloud", "environment", "bastion", "state", "role", "os", "label", "cursor", "limit"],
               "bastions": ["cloud", "environment", "cursor", "limit"], "agents": ["cloud", "environment", "cursor"],
               "clusters": ["cloud", "environment", "cursor"], "tokens": ["cursor"], "users": ["cursor"],
               "roles": ["cursor"], "rolebindings": ["cursor"],
               "audit": ["actor", "action", "resource", "since", "until", "cursor", "limit"]}
    for path, names in filters.items():
        for name in names:
            for attack in INJECTIONS:
                value = f"tier={attack}" if name == "label" else attack
                r = admin.get(f"{labd.url}/api/v1/{path}", params={name: value})
                assert r.status_code in (200, 422), (path, name, attack, r.status_code, r.text)
                if r.status_code == 200:  # accepted as a literal value: it matches nothing it should not
                    assert r.json()[path] == [] or name == "cursor", (path, name, attack)
    reached = [a for a in INJECTIONS if admin.get(f"{labd.url}/api/v1/audit", params={"resource": a}).status_code == 200]
    assert "%" in reached and "_" in reached  # LIKE's wildcards reach the query as literals (and match nothing)
    for ref in INJECTIONS:
        assert admin.get(f"{labd.url}/api/v1/servers/{ref}").status_code in (404, 405)
    assert admin.get(labd.url + "/api/v1/servers", params={"limit": 1000}).json()["servers"] == before
    with psycopg.connect(labd.database_url) as conn:  # the tables are all there
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] >= 1


def test_kubeconfig_is_sealed_at_rest(labd, admin):
    u = labd.url + "/api/v1/clusters"
    c = admin.post(u, json={"name": "sealed", "cloud": "lab1", "environment": "prod", "members": ["n1", "n2"]}).json()
    assert c["has_kubeconfig"] is False
    assert admin.get(f"{u}/sealed/kubeconfig").status_code == 404
    text = "apiVersion: v1\nclusters: [{name: sealed}]\n# marker-7e1f\n"
    assert admin.put(f"{u}/sealed/kubeconfig", data=text.encode()).status_code == 204
    with psycopg.connect(labd.database_url) as conn:
        stored = conn.execute("SELECT kubeconfig FROM clusters WHERE name = 'sealed'").fetchone()[0]
        assert stored.startswith("v1:") and "marker-7e1f" not in stored
    assert admin.get(f"{u}/sealed/kubeconfig").text == text
    other = admin.post(u, json={"name": "other", "cloud": "lab1", "environment": "prod"}).json()
    with psycopg.connect(labd.database_url) as conn:  # moved to another cluster's row, it does not open
        conn.execute("UPDATE clusters SET kubeconfig = %s WHERE name = 'other'", (stored,))
    r = admin.get(f"{u}/{other['id']}/kubeconfig")
    assert r.status_code == 409 and "marker-7e1f" not in r.text  # never the other cluster's secret
    assert "Traceback" not in labd.log()


def test_tokens_expire_and_are_revoked(labd, admin):
    u = labd.url + "/api/v1"
    t = admin.post(f"{u}/tokens", json={"kind": "api", "ttl_seconds": 60}).json()
    assert t["token"].startswith("labd_api_") and t["uses"] is None
    s = labd.session(t["token"])
    assert s.get(f"{u}/whoami").json()["user"] == "admin"
    assert "token" not in str(admin.get(f"{u}/tokens", params={"limit": 1000}).json()["tokens"][0].keys() - {"id"})
    with psycopg.connect(labd.database_url) as conn:
        conn.execute("UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = %s", (t["id"],))
    assert s.get(f"{u}/whoami").status_code == 401
    t2 = admin.post(f"{u}/tokens", json={"kind": "api", "ttl_seconds": 60}).json()
    assert admin.delete(f"{u}/tokens/{t2['id']}").status_code == 204
    assert labd.session(t2["token"]).get(f"{u}/whoami").status_code == 401
    join = admin.post(f"{u}/tokens", json={"kind": "bastion", "ttl_seconds": 600, "uses": 1, "scope": "lab1/prod/*"}).json()
    assert labd.session(join["token"]).get(f"{u}/whoami").status_code == 401  # a join token is not an API token
    assert join["user"] is None and join["scope"] == "lab1/prod/*" and join["uses"] == 1


def test_the_audit_log_pages_and_filters(labd, admin):
    u = labd.url + "/api/v1/audit"
    for i in range(5):
        admin.post(labd.url + "/api/v1/bastions", json={"name": f"audited{i}", "cloud": "lab9", "environment": "x"})
    rows = admin.get(u, params={"action": "bastions.create", "limit": 2}).json()
    seen = [r["resource"] for r in rows["audit"]]
    while rows["next"]:
        rows = admin.get(u, params={"action": "bastions.create", "limit": 2, "cursor": rows["next"]}).json()
        seen += [r["resource"] for r in rows["audit"]]
    assert len(seen) == len(set(seen)) >= 5
    since = admin.get(u, params={"limit": 1}).json()["audit"][0]["ts"]
    assert all(r["ts"] >= since for r in admin.get(u, params={"since": since}).json()["audit"])
    assert admin.get(u, params={"since": "yesterday"}).status_code == 422
    assert os.path.exists(labd.ca)
