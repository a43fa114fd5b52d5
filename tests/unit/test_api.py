"""Routes through the Flask test client: dispatch cases, auth, bad input, transitions, docs."""

from __future__ import annotations

import json
import re

import pytest

from labcore import schemas
from tests.support import ED25519, HW, INSTALL, MAC


def discover(client, mac=MAC):
    r = client.post("/api/discover", json={"mac": mac, "hardware": HW})
    assert r.status_code == 200, r.json
    return r


def queue(client, auth, **over):
    r = client.post("/api/install", json={**INSTALL, **over}, headers=auth)
    assert r.status_code == 202, r.json
    return r.json


def token_from_dispatch(client, mac=MAC) -> str:
    text = client.get(f"/dispatch?mac={mac}").get_data(as_text=True)
    m = re.search(r"token=([A-Za-z0-9_-]+)", text)
    assert m, text
    return m.group(1)


def progress(client, token, stage, percent=None, mac=MAC, message=""):
    return client.post("/api/progress", json={"mac": mac, "token": token, "stage": stage, "percent": percent, "message": message})


def machine(client, auth, mac=MAC):
    r = client.get(f"/api/machines/{mac}", headers=auth)
    return r.json if r.status_code == 200 else None


# -- dispatch ------------------------------------------------------------------------------------
def test_dispatch_unknown_machine_gets_discovery(client):
    r = client.get("/dispatch?mac=52-54-00-12-34-56")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    assert text.startswith("#!ipxe\n") and "discover" in text
    assert "no discovery environment" in text  # nothing built in this data dir


def test_dispatch_discovered_machine_gets_discovery_again(client):
    discover(client)
    assert "discovering this machine" in client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)


def test_dispatch_queued_machine_gets_install_script_and_becomes_installing(client, auth):
    discover(client)
    queue(client, auth)
    text = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    assert "inst.ks=http://localhost/ks?mac=52:54:00:12:34:56&token=" in text
    m = machine(client, auth)
    assert m["state"] == "installing" and m["stage"] == "pxe"
    assert "token" not in json.dumps(m["events"][-1]["data"])


def test_dispatch_installed_machine_boots_locally(client, auth, app):
    discover(client)
    queue(client, auth)
    token = token_from_dispatch(client)
    assert progress(client, token, "complete", 100).status_code == 200
    text = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    assert "sanboot --no-describe --drive 0x80" in text and "iseq ${platform} efi" in text
    assert "chain --autofree" not in text  # no local-boot GRUB built here: plain exit fallback
    (app.config["LAB"].images_path / "local-boot").mkdir(parents=True)
    (app.config["LAB"].images_path / "local-boot" / "grubx64.efi").write_bytes(b"x")
    text = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    assert "chain --autofree http://localhost/images/local-boot/grubx64.efi" in text
    assert machine(client, auth)["state"] == "installed"


@pytest.mark.parametrize("mode,marker", [("rescue", "inst.rescue inst.sshd"), ("pxe", "ifstat")])
def test_debug_is_one_shot_then_back(client, auth, mode, marker):
    discover(client)
    queue(client, auth)
    r = client.post("/api/debug", json={"mac": MAC, "mode": mode}, headers=auth)
    assert r.status_code == 202 and r.json["debug"] == mode
    assert marker in client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    m = machine(client, auth)
    assert m["debug"] is None and m["state"] == "install_queued"
    assert [e["kind"] for e in m["events"]][-2:] == ["debug_requested", "debug_served"]
    assert "inst.ks=" in client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)


def test_dispatch_bad_mac(client):
    for q in ("", "?mac=", "?mac=nope", "?mac=52:54:00:12:34:56%0Aimgexec"):
        r = client.get("/dispatch" + q)
        assert r.status_code == 400 and "error" in r.json


# -- lifecycle through the API -------------------------------------------------------------------
def test_full_install_with_progress_and_events(client, auth):
    discover(client)
    queue(client, auth)
    token = token_from_dispatch(client)
    for stage, pct in (("partitioning", 10), ("packages", 50), ("post-install", 90)):
        r = progress(client, token, stage, pct)
        assert r.status_code == 200 and r.json["state"] == "installing" and r.json["stage"] == stage
    assert progress(client, token, "complete", 100).json["state"] == "installed"
    m = machine(client, auth)
    assert m["state"] == "installed" and m["percent"] == 100 and m["installed_at"]
    kinds = [(e["kind"], e["from_state"], e["to_state"]) for e in m["events"]]
    assert kinds[0] == ("discover", "unknown", "discovered")
    assert ("install", "discovered", "install_queued") in kinds and ("start", "install_queued", "installing") in kinds
    assert kinds[-1] == ("complete", "installing", "installed")
    assert all(e["actor"] for e in m["events"])
    # the finished install's token is spent
    assert progress(client, token, "packages", 10).status_code == 403  # the uniform machine-facing answer


def test_progress_needs_the_install_token(client, auth):
    discover(client)
    queue(client, auth)
    token_from_dispatch(client)
    r = progress(client, "A" * 32, "packages", 10)
    assert r.status_code == 403
    assert machine(client, auth)["stage"] == "pxe"
    assert progress(client, "short", "packages").status_code == 422


def test_failure_then_requeue(client, auth):
    discover(client)
    queue(client, auth)
    token = token_from_dispatch(client)
    r = progress(client, token, "failed", message="anaconda: no disk found")
    assert r.json["state"] == "failed"
    assert machine(client, auth)["failure"] == "anaconda: no disk found"
    queue(client, auth)
    assert machine(client, auth)["state"] == "install_queued"


def test_reprovision_keeps_parameters_and_issues_a_new_token(client, auth):
    discover(client)
    queue(client, auth)
    t1 = token_from_dispatch(client)
    progress(client, t1, "complete", 100)
    r = client.post(f"/api/machines/{MAC}/reprovision", json={"role": "infra", "reason": "make it a server"}, headers=auth)
    assert r.status_code == 202 and r.json["state"] == "install_queued" and r.json["role"] == "infra" and r.json["hostname"] == "node1"
    t2 = token_from_dispatch(client)
    assert t2 != t1
    assert progress(client, t1, "packages").status_code == 403
    assert progress(client, t2, "packages").status_code == 200


def test_cancel_and_forget(client, auth):
    discover(client)
    queue(client, auth)
    r = client.post(f"/api/machines/{MAC}/cancel", headers=auth)
    assert r.status_code == 200 and r.json["state"] == "discovered"
    assert client.post(f"/api/machines/{MAC}/cancel", headers=auth).status_code == 409
    assert client.delete(f"/api/machines/{MAC}", headers=auth).status_code == 200
    assert client.get(f"/api/machines/{MAC}", headers=auth).status_code == 404
    assert client.delete(f"/api/machines/{MAC}", headers=auth).status_code == 404


@pytest.mark.parametrize("call", [
    lambda c, a: c.post("/api/install", json=INSTALL, headers=a),  # unknown machine
    lambda c, a: c.post("/api/debug", json={"mac": MAC}, headers=a),
    lambda c, a: c.post(f"/api/machines/{MAC}/reprovision", headers=a),
])
def test_unknown_machine_is_404(client, auth, call):
    r = call(client, auth)
    assert r.status_code == 404 and r.json["error"]


def test_machine_facing_answers_do_not_tell_whether_a_machine_exists(client):
    r = client.post("/api/progress", json={"mac": MAC, "token": "A" * 32, "stage": "x"})
    assert r.status_code == 403 and r.json["error"].startswith("not accepted")


def test_illegal_transitions_are_409_and_change_nothing(client, auth):
    discover(client)
    before = machine(client, auth)
    r = client.post(f"/api/machines/{MAC}/reprovision", headers=auth)
    assert r.status_code == 409 and r.json["detail"] == {"action": "reprovision", "state": "discovered"}
    after = machine(client, auth)
    assert after["updated_at"] == before["updated_at"] and len(after["events"]) == len(before["events"])


def test_hostname_must_be_unique(client, auth):
    discover(client)
    discover(client, "52:54:00:00:00:02")
    queue(client, auth)
    r = client.post("/api/install", json={**INSTALL, "mac": "52:54:00:00:00:02"}, headers=auth)
    assert r.status_code == 409 and "node1" in r.json["error"]


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("hostname", "node1\n%post\nreboot"), ("hostname", "a;rm -rf /"), ("hostname", "$(id)"),
    ("disk", "/dev/sda\nclearpart --all"), ("disk", "sda"), ("role", "root"), ("os", "windows"),
    ("ssh_keys", [ED25519 + "\nrootpw x"]), ("ssh_keys", "not a list"), ("mac", "zz"), ("extra", 1),
])
def test_hostile_install_values_are_422_and_change_nothing(client, auth, field, value):
    discover(client)
    before = machine(client, auth)
    r = client.post("/api/install", json={**INSTALL, field: value}, headers=auth)
    assert r.status_code == 422, r.json
    assert r.json["error"] == "invalid request" and r.json["detail"][0]["field"].startswith(field)
    assert machine(client, auth) == before


@pytest.mark.parametrize("body,status", [(b"{not json", 400), (b"[]", 400), (b"", 400), (b"\xff\xfe", 400), (b'"x"', 400)])
def test_malformed_bodies(client, auth, body, status):
    r = client.post("/api/install", data=body, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == status and r.json["error"]


def test_oversized_body_is_413(client):
    r = client.post("/api/discover", data=b"{" + b" " * (1024 * 1024 + 10) + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json["error"]


def test_hardware_strings_are_bounded_and_free_of_control_characters(client, auth):
    for hw in ({**HW, "dmi": {**HW["dmi"], "product": "x\ny"}}, {**HW, "dmi": {**HW["dmi"], "product": "x" * 300}},
               {**HW, "memory_mb": -1}, {**HW, "firmware": "coreboot"}, {**HW, "memory_mb": "8192"},
               {**HW, "cpu": {**HW["cpu"], "cores": "4", "flags": ["sse4_2"]}}):
        r = client.post("/api/discover", json={"mac": MAC, "hardware": hw, "image_version": "2"})
        assert r.status_code == 422, hw  # known fields stay strict, whatever unknown ones come along
    assert client.get(f"/api/machines/{MAC}", headers=auth).status_code == 404


def test_report_from_a_newer_discovery_image_keeps_its_unknown_fields(client, auth):
    """A newer discovery image sends fields this bastion does not know: the machine is accepted,
    the known fields are validated as before, the unknown ones are stored as sent (within bounds)."""
    hw = {**HW, "tpm": {"version": "2.0", "vendor": "STM"}, "cpu": {**HW["cpu"], "flags": ["sse4_2", "avx2"]},
          "disks": [{**d, "wwn": "0x5002538e"} for d in HW["disks"]]}
    r = client.post("/api/discover", json={"mac": MAC, "hardware": hw, "image_version": "2.1"})
    assert r.status_code == 200 and r.json == {"mac": MAC, "state": "discovered"}
    stored = machine(client, auth)["hardware"]
    assert stored["tpm"] == {"version": "2.0", "vendor": "STM"}
    assert stored["cpu"]["flags"] == ["sse4_2", "avx2"] and all(d["wwn"] == "0x5002538e" for d in stored["disks"])
    assert stored["report"] == {"image_version": "2.1"}
    assert stored["memory_mb"] == HW["memory_mb"]


def test_unknown_fields_beyond_the_bounds_are_dropped_not_refused(client, auth):
    many = {f"x_{i}": i for i in range(schemas.MAX_UNKNOWN_FIELDS + 3)}
    hw = {**HW, **many, "big": "x" * (schemas.MAX_UNKNOWN_BYTES + 1), "bad name": 1, "esc": "a\x1b[31mb",
          "deep": [[[[[["x"]]]]]], "dmi": {**HW["dmi"], "chassis": "rack\nmount", "sku": "S1"}}
    r = client.post("/api/discover", json={"mac": MAC, "hardware": hw})
    assert r.status_code == 200, r.json
    ignored = r.json["ignored"]
    assert {"hardware.big", "hardware.bad name", "hardware.esc", "hardware.deep", "hardware.dmi.chassis"} <= set(ignored)
    assert {f"hardware.x_{i}" for i in range(schemas.MAX_UNKNOWN_FIELDS, schemas.MAX_UNKNOWN_FIELDS + 3)} <= set(ignored)
    stored = machine(client, auth)["hardware"]
    assert stored["dmi"]["sku"] == "S1" and "chassis" not in stored["dmi"]
    kept = {k for k in stored if k.startswith("x_")}
    assert kept == {f"x_{i}" for i in range(schemas.MAX_UNKNOWN_FIELDS)}
    assert not {"big", "bad name", "esc", "deep"} & set(stored)


# -- auth ----------------------------------------------------------------------------------------
OPERATOR = [("GET", "/api/machines"), ("GET", f"/api/machines/{MAC}"), ("DELETE", f"/api/machines/{MAC}"),
            ("POST", "/api/install"), ("POST", "/api/debug"), ("POST", f"/api/machines/{MAC}/reprovision"),
            ("POST", f"/api/machines/{MAC}/cancel"), ("GET", "/api/events")]


@pytest.mark.parametrize("method,path", OPERATOR)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "Basic abc", "Bearer "])
def test_operator_endpoints_need_the_token(client, method, path, header):
    discover(client)
    headers = {"Authorization": header} if header else {}
    r = client.open(path, method=method, json=INSTALL, headers=headers)
    assert r.status_code == 401 and "Bearer" in r.json["detail"]
    assert client.get(f"/dispatch?mac={MAC}").status_code == 200


def test_token_file_is_private(app):
    path = app.config["LAB"].token_path
    assert path.stat().st_mode & 0o777 == 0o600


# -- list, filters, docs, metrics ----------------------------------------------------------------
def test_list_and_filters(client, auth):
    discover(client)
    discover(client, "52:54:00:00:00:02")
    queue(client, auth)
    all_ = client.get("/api/machines", headers=auth).json["machines"]
    assert {m["mac"] for m in all_} == {MAC, "52:54:00:00:00:02"}
    for m in all_:
        schemas.MachineView.model_validate(m)
        assert "install_token" not in m
    assert [m["mac"] for m in client.get("/api/machines?state=install_queued", headers=auth).json["machines"]] == [MAC]
    assert [m["mac"] for m in client.get("/api/machines?role=worker", headers=auth).json["machines"]] == [MAC]
    assert client.get("/api/machines?state=bogus", headers=auth).status_code == 400


def test_events_cursor(client, auth):
    discover(client)
    evs = client.get("/api/events?since=0", headers=auth).json["events"]
    assert evs and client.get(f"/api/events?since={evs[-1]['id']}", headers=auth).json["events"] == []
    assert client.get("/api/events?since=-1", headers=auth).status_code == 400


def test_openapi_describes_every_route_and_only_those(app, client):
    doc = client.get("/api/openapi.json").json
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("console."):
            continue  # the web console's HTML pages are not the JSON API (docs/console.md has them)
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, m))
    assert served == documented
    for path, ops in doc["paths"].items():
        for m, op in ops.items():
            if op.get("security"):
                assert "401" in op["responses"], (path, m)


def test_metrics_and_healthz(client, auth):
    discover(client)
    assert client.get("/healthz").json["status"] == "ok"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lab_bastion_machines{state="discovered"} 1.0' in text
    assert "lab_bastion_requests_total" in text and "lab_bastion_install_duration_seconds" in text


@pytest.mark.parametrize("host", ["evil imgexec", "a${x}b", "x'y", "a.b:80 || shell"])
def test_host_header_cannot_inject_into_ipxe(client, host):
    r = client.get(f"/dispatch?mac={MAC}", environ_base={"HTTP_HOST": host})
    text = r.get_data(as_text=True)
    assert r.status_code in (200, 400)
    assert host not in text and "shell" not in text.replace("iPXE shell", "")


def test_a_host_that_keeps_failing_gets_429_and_others_do_not(data_dir):
    from bastion_app import create_app
    from labcore import bastion_config as configmod

    cfg = configmod.load(data_dir, overrides={"error_rate": 1, "error_burst": 30, "dnsmasq": False}, env={}, detect=False)
    client = create_app(cfg).test_client()
    statuses = [client.get("/dispatch?mac=nope").status_code for _ in range(40)]
    assert statuses[:30] == [400] * 30 and statuses[-1] == 429
    r = client.get(f"/dispatch?mac={MAC}")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"  # the same host, even for a good request
    assert r.json["error"] == "too many bad requests from this host"
    other = client.get(f"/dispatch?mac={MAC}", environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 200
