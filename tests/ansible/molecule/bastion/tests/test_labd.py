"""labd on the bastion VM after converge, as an operator would check it (pytest-testinfra)."""

import json

# GET /api/v1/ca without verification (what `labctl login` does once), then /readyz and a login verified
# with that CA only: labd's server certificate must be signed by it and valid for 127.0.0.1.
PROBE = r"""
import json, ssl, sys, urllib.request
base = "https://127.0.0.1:8443"
insecure = ssl.create_default_context(); insecure.check_hostname = False; insecure.verify_mode = ssl.CERT_NONE
ca = urllib.request.urlopen(base + "/api/v1/ca", context=insecure, timeout=20).read().decode()
pinned = ssl.create_default_context(cadata=ca)
ready = urllib.request.urlopen(base + "/readyz", context=pinned, timeout=20)
body = json.dumps({"username": "admin", "password": open(sys.argv[1]).read().strip()}).encode()
req = urllib.request.Request(base + "/api/v1/login", data=body, headers={"Content-Type": "application/json"})
login = json.load(urllib.request.urlopen(req, context=pinned, timeout=20))
print(json.dumps({"ready": ready.status, "token": bool(login.get("token"))}))
"""


def test_services_run_and_are_enabled(host):
    for name in ("labd", "postgresql"):
        svc = host.service(name)
        assert svc.is_running, name
        assert svc.is_enabled, name


def test_data_dir_and_admin_password_file(host):
    data = host.file("/var/lib/labd")
    assert data.is_directory and data.user == "labd" and data.mode == 0o700
    pw = host.file("/var/lib/labd/admin-password")
    assert pw.user == "root" and pw.mode == 0o600 and len(pw.content_string.strip()) >= 12
    env = host.file("/etc/labd/labd.env")
    assert env.user == "root" and env.mode == 0o600 and "LABD_DATABASE_URL=postgresql:///labd" in env.content_string


def test_database_role_and_database(host):
    r = host.run("runuser -u postgres -- psql -XtAc \"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'labd'\"")
    assert r.rc == 0 and r.stdout.strip() == "labd", r.stdout + r.stderr


def test_https_readyz_and_login_verified_with_labds_ca(host):
    r = host.run("python3 -c %s /var/lib/labd/admin-password", PROBE)
    assert r.rc == 0, r.stderr
    assert json.loads(r.stdout) == {"ready": 200, "token": True}


def test_password_never_in_the_journal(host):
    pw = host.file("/var/lib/labd/admin-password").content_string.strip()
    assert pw not in host.run("journalctl --no-pager -o cat").stdout
