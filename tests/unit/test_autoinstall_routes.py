"""GET /autoinstall/<mac>/<token>/user-data and meta-data through the Flask app."""

from __future__ import annotations

import yaml

from tests.support import queue_install

MAC = "52:54:00:ab:cd:02"


def test_nocloud_user_data_and_meta_data(client, auth):
    token = queue_install(client, auth, os_name="ubuntu-26.04", mac=MAC, hostname="node-ai")
    dispatch = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    assert f"/autoinstall/{MAC}/{token}/" in dispatch  # the iPXE script points here
    r = client.get(f"/autoinstall/{MAC}/{token}/user-data")
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    doc = yaml.safe_load(r.get_data(as_text=True))
    assert doc["autoinstall"]["user-data"]["hostname"] == "node-ai"
    m = client.get(f"/autoinstall/{MAC}/{token}/meta-data")
    assert yaml.safe_load(m.get_data(as_text=True))["local-hostname"] == "node-ai"


def test_refusals(client, auth):
    token = queue_install(client, auth, os_name="ubuntu-26.04", mac=MAC)
    assert client.get(f"/autoinstall/{MAC}/{'x' * 24}/user-data").status_code == 403
    assert client.get(f"/autoinstall/{MAC}/bad/user-data").status_code == 400
    assert client.get(f"/autoinstall/nope/{token}/meta-data").status_code == 400
    assert client.get(f"/autoinstall/52:54:00:00:00:77/{token}/user-data").status_code == 404


def test_fedora_machine_gets_no_autoinstall(client, auth):
    token = queue_install(client, auth, os_name="fedora-43", mac=MAC)
    r = client.get(f"/autoinstall/{MAC}/{token}/user-data")
    assert r.status_code == 409 and "fedora-43" in r.json["error"]
