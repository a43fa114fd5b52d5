"""GET /ks, /debug.ks, /debug-setup.sh, /discover.ks through the Flask app (real store)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.support import KEY, queue_install

MAC = "52:54:00:ab:cd:01"


def test_ks_for_the_installing_machine(client, auth):
    token = queue_install(client, auth)
    r = client.get(f"/ks?mac={MAC}&token={token}")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    assert r.headers["Cache-Control"] == "no-store"
    text = r.get_data(as_text=True)
    assert "--hostname=node-ks" in text and f'"token":"{token}"' in text
    assert "logging --host=192.0.2.1 --port=5514" in text or "logging --host=localhost --port=5514" in text


def test_install_kernel_line_sends_anacondas_log_from_its_start(client, auth):
    queue_install(client, auth)
    script = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    [kernel] = [ln for ln in script.splitlines() if ln.startswith("kernel ")]
    words = kernel.split()
    # inst.syslog: remote logging from Anaconda's start, before the kickstart (and %pre) is parsed
    base = script.rsplit("chain --replace ", 1)[1].split("/dispatch", 1)[0]  # the bastion's URL
    assert f"inst.syslog={urlsplit(base).hostname}:5514" in words
    # ksdevice is ignored by current Anaconda (BOOTIF= picks the boot NIC)
    assert not any(w.startswith(("inst.ksdevice", "ksdevice")) for w in words)
    assert any(w.startswith("BOOTIF=01-") for w in words)


@pytest.mark.parametrize("query, status", [
    ("", 400),
    (f"mac={MAC}", 400),
    (f"mac={MAC}&token=short", 400),
    ("mac=zz&token=" + "a" * 24, 400),
    (f"mac={MAC}&token=" + "a" * 24, 403),
    ("mac=52:54:00:00:00:99&token=" + "a" * 24, 403),  # unknown MAC: the uniform answer
])
def test_ks_refuses_bad_requests(client, auth, query, status):
    queue_install(client, auth)
    r = client.get("/ks?" + query)
    assert r.status_code == status
    assert set(r.json) <= {"error", "detail"}


def test_ks_needs_an_install_in_progress(client, auth):
    assert client.post("/api/discover", json={"mac": MAC}).status_code == 200
    assert client.get(f"/ks?mac={MAC}&token=" + "a" * 24).status_code == 403


def test_ks_is_not_served_for_ubuntu(client, auth):
    token = queue_install(client, auth, os_name="ubuntu-26.04")
    r = client.get(f"/ks?mac={MAC}&token={token}")
    assert r.status_code == 409 and "ubuntu-26.04" in r.json["error"]


def test_debug_ks_uses_the_machines_keys(client, auth):
    queue_install(client, auth)
    text = client.get(f"/debug.ks?mac={MAC}").get_data(as_text=True)
    assert f"sshpw --username=root --sshkey '{KEY}'" in text
    anon = client.get("/debug.ks").get_data(as_text=True)
    assert "--lock" in anon and "--sshkey" not in anon
    assert client.get("/debug.ks?mac=nonsense").status_code == 400


def test_debug_setup_and_discover(client):
    r = client.get("/debug-setup.sh?port=5555")
    assert r.status_code == 200 and "LAB_PORT=5555" in r.get_data(as_text=True)
    assert client.get("/debug-setup.sh?port=22").status_code == 400
    assert client.get("/debug-setup.sh?port=1;reboot").status_code == 400
    d = client.get("/discover.ks")
    assert d.status_code == 200 and "LAB_ACTION=poweroff" in d.get_data(as_text=True)
