"""Power control against a real `lab-bastion serve` and real emulated BMCs: sushy-tools' Redfish
emulator and pyghmi's IPMI BMC server (tests/bmc.py), with labctl's commands in-process.

What is checked: BMC records (credentials sealed, never shown), status/on/off/cycle and the next
boot device through both drivers, idempotent on/off, reprovision --power, a batch with a cap and
a stagger, and the faults: wrong credentials, a BMC that does not answer, addresses that try
injection; credentials absent from every answer, event, log and the database file.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
from click.testing import CliRunner

from labctl.main import cli
from tests.support import HW, UEFI_HW, labctl_env, start_ipmi_bmc, start_redfish_bmc, synthetic_mac

USER, PASSWORD = "labadmin", "Sup3r-s3cret+pw"
WRONG = "not-the-Password9"
SYSTEMS = [{"uuid": f"00000000-0000-0000-0000-0000000000{i:02x}", "name": f"sys{i}", "power_state": "Off", "nics": []}
           for i in range(1, 4)]


@pytest.fixture(scope="module")
def bmcs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bmcs")
    rf = start_redfish_bmc(work / "redfish", SYSTEMS, USER, PASSWORD)
    ipmi = start_ipmi_bmc(work / "ipmi", USER, PASSWORD)
    yield rf, ipmi
    rf.stop()
    ipmi.stop()


@pytest.fixture(scope="module")
def env(bastion, tmp_path_factory):
    return labctl_env(bastion, tmp_path_factory.mktemp("labctl-home"))


@pytest.fixture
def labctl(env):
    def run(*args: str, input: str | None = None):
        return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)

    return run


def discover(bastion, mac: str, hw=HW) -> None:
    r = bastion.session().post(bastion.url + "/api/discover", json={"mac": mac, "hardware": hw})
    assert r.status_code == 200, r.text


def events(bastion, mac: str, kind: str = "power") -> list[dict]:
    return [e for e in bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()["events"] if e["kind"] == kind]


def test_redfish_set_status_cycle_and_idempotent_on(bastion, bmcs, labctl):
    rf, _ = bmcs
    mac = synthetic_mac(1, "52:54:02")
    discover(bastion, mac, UEFI_HW)
    r = labctl("power", "set", mac, "--driver", "redfish", "--address", rf.address, "--username", USER,
               "--system-id", SYSTEMS[0]["uuid"], "--password-stdin", input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    shown = bastion.session().get(f"{bastion.url}/api/machines/{mac}/bmc").json()
    assert shown["credentials"] is True and shown["driver"] == "redfish" and shown["system_id"] == SYSTEMS[0]["uuid"]
    assert PASSWORD not in json.dumps(shown) and USER not in json.dumps(shown)
    assert "off" in labctl("power", "status", mac).output
    r = labctl("-o", "json", "power", "cycle", mac, "--boot", "network")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["changed"] is True
    assert json.loads(labctl("-o", "json", "power", "status", mac).output)["power"] == "on"
    again = json.loads(labctl("-o", "json", "power", "on", mac).output)
    assert again == {"mac": mac, "driver": "redfish", "action": "on", "power": "on", "changed": False, "boot": None}
    # the emulator's own record: the next boot was set to PXE (sushy-tools keeps the target only;
    # it always shows BootSourceOverrideEnabled Continuous, so "once" cannot be read back here)
    system = requests.get(f"{rf.address}/redfish/v1/Systems/{SYSTEMS[0]['uuid']}", auth=(USER, PASSWORD), timeout=5).json()
    assert system["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    ev = events(bastion, mac)
    assert [e["data"]["action"] for e in ev] == ["status", "cycle", "status", "on"]
    assert all(e["data"]["result"] == "ok" for e in ev)


def test_ipmi_on_off_and_reprovision_power(bastion, bmcs, labctl, machines_installed):
    _, ipmi = bmcs
    mac = machines_installed
    r = labctl("power", "set", mac, "--driver", "ipmi", "--address", ipmi.address, "--username", USER,
               "--password-stdin", input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    assert json.loads(labctl("-o", "json", "power", "on", mac).output)["power"] == "on"
    assert json.loads(labctl("-o", "json", "power", "status", mac).output)["power"] == "on"
    assert json.loads(labctl("-o", "json", "power", "off", mac).output)["changed"] is True
    assert json.loads(labctl("-o", "json", "power", "status", mac).output)["power"] == "off"
    assert json.loads(labctl("-o", "json", "power", "off", mac).output)["changed"] is False
    r = labctl("provision", "reprovision", mac, "--power")
    assert r.exit_code == 0, r.output
    assert "power-cycled through its ipmi BMC" in r.output
    m = bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()
    assert m["state"] == "install_queued"
    last = events(bastion, mac)[-1]
    assert last["data"]["action"] == "cycle" and last["data"]["boot"] == "network" and last["data"]["before"] == "off"
    assert json.loads(labctl("-o", "json", "power", "status", mac).output)["power"] == "on"


def test_install_records_the_bmc_given_with_bmc_flags(bastion, bmcs, labctl):
    rf, _ = bmcs
    mac = synthetic_mac(3, "52:54:02")
    discover(bastion, mac)
    base = ["provision", "install", mac, "--hostname", "pw-inst", "--role", "worker", "--os", "debian-12"]
    r = labctl(*base, "--bmc-address", rf.address)
    assert r.exit_code != 0 and "need --bmc-driver" in r.output
    r = labctl(*base, "--bmc-driver", "ipmi", "--bmc-address", "10.0.0.1;reboot", "--bmc-username", USER,
               "--bmc-password-stdin", input=PASSWORD + "\n")
    assert r.exit_code != 0 and "invalid --bmc-address" in r.output
    assert bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()["state"] == "discovered"  # nothing sent
    r = labctl(*base, "--bmc-driver", "redfish", "--bmc-address", rf.address, "--bmc-username", USER,
               "--bmc-system-id", SYSTEMS[2]["uuid"], "--bmc-password-stdin", input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    shown = bastion.session().get(f"{bastion.url}/api/machines/{mac}/bmc").json()
    assert shown["driver"] == "redfish" and shown["credentials"] is True and shown["system_id"] == SYSTEMS[2]["uuid"]
    assert json.loads(labctl("-o", "json", "power", "status", mac).output)["power"] in ("on", "off")


@pytest.fixture
def machines_installed(bastion):
    """An installed machine (discovered, queued, served its script, reported complete)."""
    from tests.support import INSTALL, Machines

    mac = synthetic_mac(2, "52:54:02")
    ms = Machines(bastion)
    ms.discover(mac)
    bastion.session().post(bastion.url + "/api/install", json={**INSTALL, "mac": mac, "hostname": "pw-ipmi"}).raise_for_status()
    token = ms.boot(mac)
    ms.progress(mac, token, "complete", 100)
    assert bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()["state"] == "installed"
    return mac


def test_wrong_credentials_are_a_clear_error_and_an_event(bastion, bmcs, labctl):
    rf, ipmi = bmcs
    for i, (driver, address) in enumerate([("redfish", rf.address), ("ipmi", ipmi.address)]):
        mac = synthetic_mac(10 + i, "52:54:02")
        discover(bastion, mac)
        before = bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()
        assert labctl("power", "set", mac, "--driver", driver, "--address", address, "--username", USER,
                      "--password-stdin", input=WRONG + "\n").exit_code == 0
        r = labctl("power", "on", mac)
        assert r.exit_code == 1
        assert "refused the credentials" in r.output
        resp = bastion.session().post(f"{bastion.url}/api/machines/{mac}/power", json={"action": "on"})
        assert resp.status_code == 502 and resp.json()["detail"]["code"] == "bmc_auth"
        after = bastion.session().get(f"{bastion.url}/api/machines/{mac}").json()
        ev = after.pop("events")
        before.pop("events")
        assert after == before  # nothing else changed
        assert [e["data"]["result"] for e in ev if e["kind"] == "power"] == ["error", "error"]
        assert WRONG not in json.dumps(ev) and WRONG not in r.output


@pytest.fixture
def silent_bmc():
    """A TCP port that accepts connections and never answers (a hung BMC web server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_a_bmc_that_does_not_answer_times_out_without_hanging_the_api(bastion, silent_bmc):
    from bastion_app import power

    mac = synthetic_mac(20, "52:54:02")
    discover(bastion, mac)
    s = bastion.session()
    s.put(f"{bastion.url}/api/machines/{mac}/bmc",
          json={"driver": "redfish", "address": silent_bmc, "username": USER, "password": PASSWORD}).raise_for_status()
    result = {}

    def call():
        t = time.monotonic()
        result["resp"] = s.post(f"{bastion.url}/api/machines/{mac}/power", json={"action": "on"}, timeout=60)
        result["seconds"] = time.monotonic() - t

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1)
    # meanwhile the API answers other requests at once
    t0 = time.monotonic()
    assert bastion.session().get(bastion.url + "/api/machines", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 2
    t.join(60)
    resp = result["resp"]
    assert resp.status_code == 504, resp.text
    assert resp.json()["detail"]["code"] == "bmc_unreachable"
    timeout = 8  # the bastion's default bmc_timeout
    bound = power.ATTEMPTS * (power.CONNECT_S + timeout) + power.RETRY_DELAY_S + 5
    assert timeout <= result["seconds"] <= bound
    assert events(bastion, mac)[-1]["data"]["code"] == "bmc_unreachable"


@pytest.mark.parametrize("body, field", [
    ({"driver": "redfish", "address": "10.0.0.1/redfish;rm -rf /"}, "address"),
    ({"driver": "redfish", "address": "http://user:pw@10.0.0.1"}, "address"),
    ({"driver": "redfish", "address": "10.0.0.1\nHost: evil"}, "address"),
    ({"driver": "redfish", "address": "10.0.0.1:99999"}, "address"),
    ({"driver": "redfish", "address": "[::1]:8000"}, "address"),
    ({"driver": "ipmi", "address": "300.1.1.1"}, "address"),
    ({"driver": "ipmi", "address": "https://10.0.0.1"}, "address"),
    ({"driver": "redfish", "address": "$(reboot)"}, "address"),
    ({"driver": "redfish", "address": "10.0.0.1", "system_id": "../../Managers/1"}, "system_id"),
    ({"driver": "redfish", "address": "10.0.0.1", "username": "root;id"}, "username"),
    ({"driver": "redfish", "address": "10.0.0.1", "password": "pw\nX-Injected: 1"}, "password"),
    ({"driver": "ipmi", "address": "10.0.0.1", "system_id": "1"}, "system_id"),
])
def test_injection_attempts_are_refused_and_change_nothing(bastion, body, field):
    mac = synthetic_mac(30, "52:54:02")
    discover(bastion, mac)
    s = bastion.session()
    before = s.get(f"{bastion.url}/api/machines/{mac}").json()
    resp = s.put(f"{bastion.url}/api/machines/{mac}/bmc", json={"username": USER, "password": PASSWORD, **body})
    assert resp.status_code == 422, resp.text
    assert set(resp.json()) == {"error", "detail"}
    assert any(field in d["field"] or d["message"].startswith(field) for d in resp.json()["detail"]), resp.json()
    assert PASSWORD not in resp.text
    assert s.get(f"{bastion.url}/api/machines/{mac}/bmc").status_code == 404
    assert s.get(f"{bastion.url}/api/machines/{mac}").json() == before


def test_batch_with_a_cap_and_a_stagger_shows_progress(bastion, bmcs, labctl):
    rf, _ = bmcs
    macs = [synthetic_mac(40 + i, "52:54:02") for i in range(3)]
    for mac, system in zip(macs, SYSTEMS, strict=True):
        discover(bastion, mac)
        bastion.session().put(f"{bastion.url}/api/machines/{mac}/bmc", json={
            "driver": "redfish", "address": rf.address, "username": USER, "password": PASSWORD,
            "system_id": system["uuid"]}).raise_for_status()
    bastion.session().post(f"{bastion.url}/api/machines/{macs[0]}/power", json={"action": "off"}).raise_for_status()
    t = time.monotonic()
    r = labctl("power", "on", *macs, "--max-parallel", "2", "--stagger", "0.5")
    took = time.monotonic() - t
    assert r.exit_code == 0, r.output
    assert [line.split("]")[0] for line in r.output.splitlines()] == ["[1/3", "[2/3", "[3/3"]
    assert took >= 1.0  # three starts, at least 0.5 s apart
    starts = sorted(e["ts"] for mac in macs for e in events(bastion, mac)[-1:])
    assert len(starts) == 3
    for mac in macs:
        assert events(bastion, mac)[-1]["data"]["power"] == "on"


def test_batch_api_streams_each_result_through_the_front(bastion, bmcs):
    """POST /api/power: the bastion staggers the starts itself, nginx passes each line on as it ends
    (the first arrives well before the last start), a failed call is a line, then the summary."""
    rf, _ = bmcs
    macs = [synthetic_mac(70 + i, "52:54:02") for i in range(4)]
    s = bastion.session()
    for mac, system in zip(macs, SYSTEMS, strict=False):
        discover(bastion, mac)
        s.put(f"{bastion.url}/api/machines/{mac}/bmc", json={
            "driver": "redfish", "address": rf.address, "username": USER, "password": PASSWORD,
            "system_id": system["uuid"]}).raise_for_status()
    discover(bastion, macs[3])  # no BMC: its line is the error
    unknown = synthetic_mac(79, "52:54:02")
    assert s.post(f"{bastion.url}/api/power", json={"macs": [macs[0], unknown], "action": "on"}).status_code == 404
    assert s.post(f"{bastion.url}/api/power", json={"macs": macs, "action": "on", "max_parallel": 0}).status_code == 422
    assert s.post(f"{bastion.url}/api/power", json={"macs": macs, "action": "on", "stagger": 61}).status_code == 422
    t = time.monotonic()
    resp = s.post(f"{bastion.url}/api/power", json={"macs": macs, "action": "status", "max_parallel": 4,
                                                    "stagger": 0.6}, stream=True, timeout=30)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    lines = []
    for raw in resp.iter_lines(chunk_size=None):
        lines.append((time.monotonic() - t, json.loads(raw)))
    assert [set(r) >= {"mac", "power"} for _, r in lines[:3]] == [True] * 3
    failed = [r for _, r in lines if "error" in r]
    assert len(failed) == 1 and failed[0]["mac"] == macs[3] and failed[0]["status"] == 404
    assert lines[-1][1]["summary"]["total"] == 4 and lines[-1][1]["summary"]["failed"] == 1
    assert lines[-1][1]["summary"]["seconds"] >= 1.8  # four starts 0.6 s apart, though four could run at once
    assert lines[0][0] < lines[-1][0] - 1.0  # streamed, not buffered until the end


def test_install_request_records_the_bmc(bastion, bmcs):
    from tests.support import INSTALL

    rf, _ = bmcs
    mac = synthetic_mac(50, "52:54:02")
    discover(bastion, mac)
    s = bastion.session()
    body = {**INSTALL, "mac": mac, "hostname": "pw-install",
            "bmc": {"driver": "redfish", "address": rf.address, "username": USER, "password": PASSWORD,
                    "system_id": SYSTEMS[2]["uuid"]}}
    resp = s.post(bastion.url + "/api/install", json=body)
    assert resp.status_code == 202, resp.text
    assert PASSWORD not in resp.text
    assert s.get(f"{bastion.url}/api/machines/{mac}/power").json()["driver"] == "redfish"


def test_discovery_records_an_unconfigured_bmc(bastion):
    mac = synthetic_mac(60, "52:54:02")
    discover(bastion, mac, {**HW, "bmc": {"ipmi": True}})
    s = bastion.session()
    b = s.get(f"{bastion.url}/api/machines/{mac}/bmc").json()
    assert b["source"] == "discovery" and b["address"] is None and b["credentials"] is False
    resp = s.post(f"{bastion.url}/api/machines/{mac}/power", json={"action": "on"})
    assert resp.status_code == 409 and "not configured" in resp.json()["error"]


def test_credentials_are_nowhere_in_clear(bastion, bmcs):
    """After every test above: no answer, event, log or database file holds a password."""
    s = bastion.session()
    everything = json.dumps(s.get(bastion.url + "/api/events", params={"limit": 5000}).json())
    everything += json.dumps(s.get(bastion.url + "/api/machines").json())
    everything += bastion.log()
    for f in bastion.data_dir.rglob("*"):
        if f.is_file() and f.name != "secret.key":
            everything += f.read_bytes().decode("latin-1")
    assert "bmc_set" in everything and "power" in everything
    for secret in (PASSWORD, WRONG):
        assert secret not in everything
    assert (bastion.data_dir / "secret.key").stat().st_mode & 0o777 == 0o600
