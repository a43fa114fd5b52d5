"""labd's clients against the session's real `labd serve` (HTTPS, its own CA): `labctl login` with CA
pinning, `labctl get|describe|create|delete` of labd's resources with selectors, `labctl logout`, and
the lab.platform.lab inventory plugin with a labd source.

labctl is run as a user types it (the real click command tree, stdout, stderr, exit code) with a
home of its own per test; the inventory through the real `ansible-inventory`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import BIN, ansible_env, ca_fp, inventory_list, labctl, logged_in, run, serve_labd, unsafe
from tests.vm.ansible import collections_path

SERVERS = [
    {"mac": "52:54:00:d0:00:01", "hostname": "w1", "role": "worker", "os": "debian-12", "state": "installed",
     "ip": "10.7.0.11", "cloud": "lab1", "environment": "prod", "bastion": "b1", "labels": {"rack": "r1", "team/x": "a"},
     "hardware": {"firmware": "uefi", "memory_mb": 4096, "dmi": {"product": "{{ lookup('pipe','id') }}"}}},
    {"mac": "52:54:00:d0:00:02", "hostname": "w2", "role": "worker", "os": "debian-12", "state": "installed",
     "ip": "10.7.0.12", "cloud": "lab1", "environment": "dev", "bastion": "b2", "labels": {"rack": "r2"}},
    {"mac": "52:54:00:d0:00:03", "hostname": "i1", "role": "infra", "os": "fedora-43", "state": "discovered",
     "cloud": "lab2", "environment": "prod", "labels": {}},
]


@pytest.fixture(scope="module")
def labd(postgres, tmp_path_factory):
    """A labd of this module's own: its listings are asserted whole, so no other module's rows may
    be in them (the session's labd serves every other module, in any order)."""
    yield from serve_labd(postgres, tmp_path_factory, "labd_clients")


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def servers(labd, admin):
    for s in SERVERS:
        r = admin.post(labd.url + "/api/v1/servers", json=s, timeout=20)
        assert r.status_code in (201, 409), r.text
    return SERVERS


@pytest.fixture
def home(tmp_path):
    """A user with no labctl settings at all."""
    return {"LABCTL_HOME": str(tmp_path / "labctl"), "LABCTL_CONFIG": str(tmp_path / "labctl" / "config.yaml"),
            "LABCTL_BASTION_URL": "", "LABCTL_TOKEN": "", "LABCTL_OUTPUT": "", "LABCTL_CONTEXT": "", "LABCTL_LABD_URL": ""}


def test_login_pins_the_ca_and_stores_the_token_0600(labd, home):
    r = labctl(home, "login", labd.url, "--username", "admin", "--password-stdin",
               "--ca-fingerprint", ca_fp(labd).upper().replace("SHA256:", "sha256:"), input=labd.admin_password + "\n")
    assert r.exit_code == 0, r.output
    assert f"Logged in to {labd.url} as admin; context 127.0.0.1 (current)" in r.stdout
    cfg_path = home["LABCTL_CONFIG"]
    assert stat.S_IMODE(os.stat(cfg_path).st_mode) == 0o600
    doc = yaml.safe_load(open(cfg_path))
    ctx = doc["contexts"]["127.0.0.1"]
    assert doc["current-context"] == "127.0.0.1" and ctx["labdUrl"] == labd.url and ctx["token"].startswith("labd_api_")
    pinned = os.path.join(home["LABCTL_HOME"], "ca", "127.0.0.1.pem")
    assert open(pinned).read().strip() == open(labd.ca).read().strip()
    assert labd.admin_password not in open(cfg_path).read() and labd.admin_password not in r.output
    # the stored token works, through the pinned CA
    r = labctl(home, "get", "users", "-o", "json")
    assert r.exit_code == 0, r.output
    assert "admin" in [u["name"] for u in json.loads(r.stdout)["users"]]


def test_first_login_asks_to_trust_the_ca_and_a_no_stores_nothing(labd, home):
    fp = ca_fp(labd)
    r = labctl(home, "login", labd.url, "--context", "central", input="n\n")
    assert r.exit_code == 4 and fp in r.stderr and "not trusted; nothing stored" in r.stderr
    assert not os.path.exists(home["LABCTL_CONFIG"]) and not os.path.exists(os.path.join(home["LABCTL_HOME"], "ca"))
    r = labctl(home, "login", labd.url, "--context", "central", input=f"y\nadmin\n{labd.admin_password}\n")
    assert r.exit_code == 0, r.output
    assert fp in r.stderr and "context central (current)" in r.stdout
    # the second login trusts the pinned CA without asking
    r = labctl(home, "login", labd.url, "--context", "central", "-u", "admin", input=f"{labd.admin_password}\n")
    assert r.exit_code == 0 and "Trust it" not in r.stderr, r.output
    # a script cannot be asked: --password-stdin without --ca-fingerprint on a new context is refused
    r = labctl(home, "login", labd.url, "--context", "other", "-u", "admin", "--password-stdin", input="x\n")
    assert r.exit_code == 2 and f"--ca-fingerprint {fp}" in r.stderr


def test_a_wrong_fingerprint_or_password_is_refused_and_nothing_stored(labd, home):
    r = labctl(home, "login", labd.url, "-u", "admin", "--password-stdin", "--ca-fingerprint", "sha256:" + "ab" * 32,
               input=labd.admin_password + "\n")
    assert r.exit_code == 4 and "refusing to trust it" in r.stderr and ca_fp(labd) in r.stderr
    assert not os.path.exists(home["LABCTL_CONFIG"])
    r = labctl(home, "login", labd.url, "-u", "admin", "--password-stdin", "--ca-fingerprint", ca_fp(labd), input="wrong\n")
    assert r.exit_code == 4 and "wrong user name or password" in r.stderr
    assert not os.path.exists(home["LABCTL_CONFIG"]) and not os.path.exists(os.path.join(home["LABCTL_HOME"], "ca", "127.0.0.1.pem"))


def test_the_pinned_ca_is_the_only_one_trusted(labd, home):
    logged_in(home, labd)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.UTC)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(7)
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    with open(os.path.join(home["LABCTL_HOME"], "ca", "127.0.0.1.pem"), "wb") as f:
        f.write(other.public_bytes(serialization.Encoding.PEM))
    r = labctl(home, "get", "servers")
    assert r.exit_code == 3 and "failed TLS verification" in r.stderr and "pinned" in r.stderr


def test_get_servers_with_selectors_cloud_and_env(labd, home, servers):
    logged_in(home, labd)

    def names(*args):
        r = labctl(home, "get", "servers", "-o", "json", *args)
        assert r.exit_code == 0, r.output
        return sorted(s["hostname"] for s in json.loads(r.stdout)["servers"])

    assert names() == ["i1", "w1", "w2"]
    assert names("-l", "role=worker") == ["w1", "w2"]
    assert names("--cloud", "lab1", "--env", "prod") == ["w1"]
    assert names("-l", "rack=r1") == ["w1"] and names("-l", "rack!=r1") == ["i1", "w2"]
    assert names("-l", "bastion=b2,role=worker") == ["w2"] and names("--state", "discovered") == ["i1"]
    r = labctl(home, "get", "servers", "-o", "wide", "--cloud", "lab1")
    assert r.exit_code == 0
    header, *rows = r.stdout.splitlines()
    assert header.split()[:9] == ["NAME", "MAC", "STATE", "ROLE", "OS", "BASTION", "CLOUD", "ENV", "IP"] and "LABELS" in header
    assert rows[0].split()[:9] == ["w1", "52:54:00:d0:00:01", "installed", "worker", "debian-12", "b1", "lab1", "prod", "10.7.0.11"]
    assert "rack=r1,team/x=a" in rows[0]
    r = labctl(home, "get", "servers", "-o", "yaml", "w2")
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["labels"] == {"rack": "r2"}
    r = labctl(home, "get", "servers", "--cloud", "nowhere")
    assert r.exit_code == 0 and r.stdout == "" and "No servers found." in r.stderr
    r = labctl(home, "describe", "server", "w1")
    assert r.exit_code == 0, r.output
    for line in ("Name:             w1", "MAC:              52:54:00:d0:00:01", "Bastion:        b1", "Cloud:          lab1",
                 "Environment:    prod", "Labels:         rack=r1,team/x=a"):
        assert line in r.stdout, r.stdout
    r = labctl(home, "describe", "server", "nope")
    assert r.exit_code == 5 and "no such server" in r.stderr
    r = labctl(home, "get", "machines")  # machines are a bastion's: said so, not tried on 127.0.0.1:8080
    assert r.exit_code == 2 and "labctl get servers" in r.stderr


def test_users_roles_bindings_tokens_audit_and_logout(labd, home):
    logged_in(home, labd)
    r = labctl(home, "create", "role", "rack-reader", "--rule", "read:servers:lab1/*/*", "--description", "reads lab1")
    assert r.exit_code == 0 and "role rack-reader created" in r.stdout, r.output
    r = labctl(home, "create", "user", "carol", "--role", "rack-reader", "--password-stdin", input="carol-password-123\n")
    assert r.exit_code == 0 and "user carol created with role(s) rack-reader" in r.stdout, r.output
    r = labctl(home, "get", "rolebindings", "-o", "json")
    binding = next(b for b in json.loads(r.stdout)["rolebindings"] if b["user"] == "carol")
    assert binding["role"] == "rack-reader" and binding["scope"] == "*"
    r = labctl(home, "get", "roles")
    assert r.exit_code == 0 and any(line.split()[:2] == ["admin", "yes"] for line in r.stdout.splitlines())
    r = labctl(home, "create", "token", "--kind", "bastion", "--ttl", "600", "--uses", "1", "--scope", "lab1/prod/*")
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip()
    assert secret.startswith("labd_bastion_") and "not shown again" in r.stderr
    r = labctl(home, "get", "tokens", "-o", "json")
    tokens = json.loads(r.stdout)["tokens"]
    mine = next(t for t in tokens if t["kind"] == "bastion" and t["scope"] == "lab1/prod/*")
    assert secret not in r.stdout and mine["uses"] == 1
    assert labctl(home, "delete", "token", mine["id"]).exit_code == 0
    carol = json.loads(labctl(home, "get", "user", "carol", "-o", "json").stdout)
    r = labctl(home, "get", "audit", "-l", "action=users.create", "-o", "json")
    assert r.exit_code == 0 and any(a["resource"] == f"users/{carol['id']}" for a in json.loads(r.stdout)["audit"])
    assert "carol-password-123" not in labctl(home, "get", "audit", "-o", "json").stdout
    assert labctl(home, "delete", "rolebinding", binding["id"]).exit_code == 0
    assert labctl(home, "delete", "user", "carol").exit_code == 0
    r = labctl(home, "delete", "user", "carol")
    assert r.exit_code == 5 and "no such user" in r.stderr
    assert labctl(home, "delete", "user", "carol", "--ignore-not-found").exit_code == 0
    assert labctl(home, "delete", "role", "rack-reader").exit_code == 0
    # logout revokes the token at labd and forgets it
    token = yaml.safe_load(open(home["LABCTL_CONFIG"]))["contexts"]["127.0.0.1"]["token"]
    r = labctl(home, "logout")
    assert r.exit_code == 0 and "token removed from context 127.0.0.1" in r.stdout
    assert "token" not in yaml.safe_load(open(home["LABCTL_CONFIG"]))["contexts"]["127.0.0.1"]
    assert requests.get(labd.url + "/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}, verify=labd.ca,
                        timeout=10).status_code == 401
    r = labctl(home, "get", "servers")
    assert r.exit_code == 4 and "labctl login" in r.stderr


def test_login_with_an_existing_token(labd, home, admin):
    token = admin.post(labd.url + "/api/v1/tokens", json={"kind": "api", "ttl_seconds": 600}, timeout=10).json()["token"]
    r = labctl(home, "login", labd.url, "--token", token, "--ca-fingerprint", ca_fp(labd), "--context", "ci")
    assert r.exit_code == 0 and "as admin; context ci" in r.stdout, r.output
    r = labctl(home, "login", labd.url, "--token", "labd_api_" + "x" * 43, "--ca-fingerprint", ca_fp(labd), "--context", "ci2")
    assert r.exit_code == 4 and "ci2" not in (yaml.safe_load(open(home["LABCTL_CONFIG"])) or {}).get("contexts", {})


def server_lists(labd) -> float:
    """labd_requests_total of GET /api/v1/servers (all statuses), from /metrics."""
    text = requests.get(labd.url + "/metrics", verify=labd.ca, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("labd_requests_total{") and 'endpoint="/api/v1/servers"' in line and 'method="GET"' in line)


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return collections_path(tmp_path_factory.mktemp("collections"))


def test_inventory_plugin_reads_labd_in_one_request(labd, admin, servers, coll, tmp_path):
    token = admin.post(labd.url + "/api/v1/tokens", json={"kind": "api", "ttl_seconds": 600}, timeout=10).json()["token"]
    inv = tmp_path / "lab.yml"
    inv.write_text(json.dumps({"plugin": "lab.platform.lab", "sources": [{"url": labd.url, "kind": "labd"}],
                               "ca_file": labd.ca, "states": ["installed", "discovered"]}))
    before = server_lists(labd)
    data = inventory_list(inv, ansible_env(coll, LAB_LABD_TOKEN=token))
    hv = unsafe(data["_meta"]["hostvars"])
    assert sorted(hv) == ["i1", "w1", "w2"]
    w1 = hv["w1"]
    assert (w1["ansible_host"], w1["lab_bastion"], w1["lab_cloud"], w1["lab_environment"]) == ("10.7.0.11", "b1", "lab1", "prod")
    assert w1["lab_labels"] == {"rack": "r1", "team/x": "a"} and w1["lab_role"] == "worker" and w1["lab_firmware"] == "uefi"
    assert data["_meta"]["hostvars"]["w1"]["lab_dmi_product"] == {"__ansible_unsafe": "{{ lookup('pipe','id') }}"}
    assert "ansible_host" not in hv["i1"]
    assert set(data["lab_cloud_lab1"]["hosts"]) == {"w1", "w2"} and data["lab_cloud_lab2"]["hosts"] == ["i1"]
    assert set(data["lab_env_prod"]["hosts"]) == {"w1", "i1"} and data["lab_env_dev"]["hosts"] == ["w2"]
    assert data["lab_label_rack_r1"]["hosts"] == ["w1"] and data["lab_label_team_x_a"]["hosts"] == ["w1"]
    assert data["lab_bastion_b1"]["hosts"] == ["w1"] and set(data["lab_role_worker"]["hosts"]) == {"w1", "w2"}
    assert data["lab_state_discovered"]["hosts"] == ["i1"]
    assert server_lists(labd) - before == 1  # one request for the source
    # without the CA file the plugin refuses labd's certificate; without a token labd refuses the plugin
    strict = {"ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"}
    inv.write_text(json.dumps({"plugin": "lab.platform.lab", "sources": [{"url": labd.url, "kind": "labd"}]}))
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list"], ansible_env(coll, LAB_LABD_TOKEN=token, **strict))
    assert r.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
    inv.write_text(json.dumps({"plugin": "lab.platform.lab", "sources": [{"url": labd.url, "kind": "labd"}], "ca_file": labd.ca}))
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list"], ansible_env(coll, **strict))
    assert r.returncode != 0 and "HTTP 401" in r.stderr and "LAB_LABD_TOKEN" in r.stderr, r.stderr


def test_get_bastions_agents_clusters(labd, home, admin):
    for path, body in (("bastions", {"name": "b-c1", "cloud": "lab9", "environment": "prod"}),
                       ("agents", {"hostname": "a-c1", "cloud": "lab9", "environment": "prod", "server": "w1"}),
                       ("clusters", {"name": "k-c1", "cloud": "lab9", "environment": "prod", "members": ["w1", "w2"]})):
        r = admin.post(f"{labd.url}/api/v1/{path}", json=body, timeout=10)
        assert r.status_code in (201, 409), r.text
    logged_in(home, labd)
    r = labctl(home, "get", "bastions", "--cloud", "lab9")
    assert r.exit_code == 0, r.output
    assert [line.split()[:4] for line in r.stdout.splitlines()] == [["NAME", "CLOUD", "ENV", "STATUS"],
                                                                     ["b-c1", "lab9", "prod", "never-connected"]]
    r = labctl(home, "get", "agents", "-l", "cloud=lab9", "-o", "wide")
    assert r.exit_code == 0 and r.stdout.splitlines()[1].split()[:3] == ["a-c1", "w1", "pending"], r.stdout
    r = labctl(home, "get", "clusters", "--env", "prod", "--cloud", "lab9")
    assert r.stdout.splitlines()[1].split() == ["k-c1", "lab9", "prod", "2", "no"], r.stdout
    r = labctl(home, "get", "clusters", "-l", "rack=r1")  # clusters have no labels: refused before sending
    assert r.exit_code == 2 and "clusters cannot be selected by 'rack'" in r.stderr
    r = labctl(home, "describe", "cluster", "k-c1")
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["members"] == ["w1", "w2"]
    assert labctl(home, "delete", "cluster", "k-c1").exit_code == 0
    assert labctl(home, "get", "cluster", "k-c1").exit_code == 5
