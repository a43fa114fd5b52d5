"""The SQLite store: migrations, events, export/import of the seed's state.json, stall marking."""

from __future__ import annotations

import ast
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from bastion_app.stateio import validate_state_doc
from bastion_app.store import MIGRATIONS, Conflict, Forbidden, Full, NotFound, Store
from labcore.lifecycle import IllegalTransition
from tests.support import HW, INSTALL, synthetic_mac

MAC = INSTALL["mac"]
PARAMS = {k: INSTALL[k] for k in ("hostname", "role", "os", "disk", "ssh_keys")}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_wal_and_schema_version(store, tmp_path):
    assert store.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version() == len(MIGRATIONS)
    assert Store(tmp_path / "state.db").migrate() == len(MIGRATIONS)  # reopening is a no-op
    assert store.integrity_check() == "ok"


def test_newer_schema_is_refused(tmp_path):
    c = sqlite3.connect(tmp_path / "state.db")
    c.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    c.close()
    with pytest.raises(RuntimeError, match="newer than this bastion"):
        Store(tmp_path / "state.db")


def test_every_change_is_an_event(store):
    store.discover(MAC, HW, ip="10.0.0.5")
    store.queue_install(MAC, PARAMS, actor="operator@test", reason="first install")
    m = store.start_install(MAC, ip="10.0.0.5")
    store.progress(MAC, token=m["install_token"], stage="packages", percent=40, message="", ip="10.0.0.5")
    store.request_debug(MAC, "rescue", actor="operator@test")
    assert store.take_debug(MAC) == "rescue" and store.take_debug(MAC) is None
    evs = store.events(MAC)
    assert [e["kind"] for e in evs] == ["discover", "install", "start", "progress", "debug_requested", "debug_served"]
    assert evs[1]["actor"] == "operator@test" and evs[1]["reason"] == "first install"
    assert evs[3]["data"]["percent"] == 40


def test_failed_change_rolls_back(store):
    store.discover(MAC, HW, ip=None)
    with pytest.raises(IllegalTransition):
        store.reprovision(MAC, {}, actor="t")
    with pytest.raises(NotFound):
        store.queue_install("52:54:00:99:99:99", PARAMS, actor="t")
    store.queue_install(MAC, PARAMS, actor="t")
    m = store.start_install(MAC, ip=None)
    with pytest.raises(Forbidden):
        store.progress(MAC, token="B" * 32, stage="packages", percent=1, message="", ip=None)
    assert store.get(MAC)["version"] == m["version"]
    assert [e["kind"] for e in store.events(MAC)] == ["discover", "install", "start"]


def test_hostname_conflict(store):
    store.discover(MAC, HW, ip=None)
    store.discover("52:54:00:00:00:02", HW, ip=None)
    store.queue_install(MAC, PARAMS, actor="t")
    with pytest.raises(Conflict):
        store.queue_install("52:54:00:00:00:02", PARAMS, actor="t")


def test_mark_stalled(store):
    store.discover(MAC, HW, ip=None)
    store.queue_install(MAC, PARAMS, actor="t")
    store.start_install(MAC, ip=None)
    assert store.mark_stalled(60) == []
    assert store.mark_stalled(60, now=time.time() + 120) == [MAC]
    m = store.get(MAC)
    assert m["state"] == "failed" and m["failure"] == "stalled" and m["install_token"] is None
    assert store.events(MAC)[-1]["kind"] == "stall"


def test_event_ids_and_the_machines_that_changed(store):
    """What the follow watcher polls: the newest event id, and which machines have events in an
    id range (after < id <= upto)."""
    other = "52:54:00:00:00:02"
    assert store.last_event_id() == 0
    assert store.macs_with_events(0, 0) == set()
    store.discover(MAC, HW, ip=None)
    first = store.last_event_id()
    assert first == store.events(MAC)[-1]["id"] > 0
    store.discover(other, HW, ip=None)
    store.queue_install(other, PARAMS, actor="t")
    top = store.last_event_id()
    assert top == store.events()[-1]["id"] > first
    assert store.macs_with_events(0, top) == {MAC, other}
    assert store.macs_with_events(first, top) == {other}
    assert store.macs_with_events(0, first) == {MAC}
    assert store.macs_with_events(top, top + 100) == set()


def test_count_stalled(store):
    """Only installs failed for lack of progress count, not those the installer reported failed."""
    other = "52:54:00:00:00:02"
    assert store.count_stalled() == 0
    for mac, name in ((MAC, "node1"), (other, "node2")):
        store.discover(mac, HW, ip=None)
        store.queue_install(mac, {**PARAMS, "hostname": name}, actor="t")
    m = store.start_install(other, ip=None)
    store.progress(other, token=m["install_token"], stage="failed", percent=None, message="disk error", ip=None)
    assert store.get(other)["state"] == "failed" and store.count_stalled() == 0
    store.start_install(MAC, ip=None)
    assert store.count_stalled() == 0
    store.mark_stalled(60, now=time.time() + 120)
    assert store.count_stalled() == 1


def test_machine_addresses(store):
    """ip -> mac from the machines' last known addresses: the most recently seen machine wins an
    address that two share; machines without an address are left out."""
    a, b, c = MAC, "52:54:00:00:00:02", "52:54:00:00:00:03"
    assert store.macs_by_ip() == {} and store.mac_for_ip("10.0.0.5") is None
    store.discover(a, HW, ip="10.0.0.5")
    store.discover(c, HW, ip=None)
    time.sleep(0.01)
    store.discover(b, HW, ip="10.0.0.5")  # b took a's address (a DHCP lease moved on)
    store.seen(c, "10.0.0.7")
    assert store.macs_by_ip() == {"10.0.0.5": b, "10.0.0.7": c}
    assert store.mac_for_ip("10.0.0.5") == b and store.mac_for_ip("10.0.0.7") == c
    time.sleep(0.01)
    store.seen(a, None)  # a called again (from an address the bastion did not see): a is newest
    assert store.macs_by_ip()["10.0.0.5"] == a and store.mac_for_ip("10.0.0.5") == a
    assert store.mac_for_ip("10.0.0.9") is None


def _populate(store):
    store.discover(MAC, HW, ip="10.0.0.5")
    store.queue_install(MAC, PARAMS, actor="t")
    m = store.start_install(MAC, ip=None)
    store.progress(MAC, token=m["install_token"], stage="complete", percent=100, message="", ip=None)
    store.discover("52:54:00:00:00:02", HW, ip=None)
    store.request_debug("52:54:00:00:00:02", "pxe", actor="t")
    store.discover("52:54:00:00:00:03", HW, ip=None)
    store.queue_install("52:54:00:00:00:03", {**PARAMS, "hostname": "node3", "disk": "/dev/nvme0n1"}, actor="t")


def test_export_shape_and_round_trip(store, tmp_path):
    _populate(store)
    doc = store.export_state()
    assert set(doc) == {"discovered", "install_queue", "installed", "debug"}
    assert set(doc["installed"]) == {MAC} and doc["installed"][MAC]["hostname"] == "node1"
    assert set(doc["discovered"]) == {"52:54:00:00:00:02"} and doc["debug"] == {"52:54:00:00:00:02": {"mode": "pxe"}}
    assert doc["install_queue"]["52:54:00:00:00:03"]["disk"] == "/dev/nvme0n1"
    other = Store(tmp_path / "other.db")
    assert other.import_state(validate_state_doc(json.loads(json.dumps(doc))), actor="import") == 3
    again = other.export_state()
    for section in doc:
        for mac, entry in doc[section].items():
            for k, val in entry.items():
                if k not in ("first_seen", "installed_at"):
                    assert again[section][mac][k] == val, (section, mac, k)


def test_import_is_all_or_nothing(store, tmp_path):
    _populate(store)
    doc = json.loads(json.dumps(store.export_state()))
    target = Store(tmp_path / "t.db")
    target.discover("52:54:00:00:00:03", HW, ip=None)
    with pytest.raises(Conflict, match="already in the store"):
        target.import_state(validate_state_doc(doc), actor="import")
    assert [m["mac"] for m in target.list()] == ["52:54:00:00:00:03"]
    assert target.import_state(validate_state_doc(doc), actor="import", replace=True) == 3


@pytest.mark.parametrize("mutate", [
    lambda d: d["installed"]["52:54:00:12:34:56"].update(hostname="bad\nname"),
    lambda d: d.update(extra={}),
    lambda d: d["discovered"].update({"not-a-mac": {}}),
    lambda d: d["installed"]["52:54:00:12:34:56"].update(disk="/dev/sda; reboot"),
])
def test_import_rejects_bad_documents(store, mutate):
    _populate(store)
    doc = json.loads(json.dumps(store.export_state()))
    mutate(doc)
    with pytest.raises((ValueError,)):
        validate_state_doc(doc)


def test_sql_lives_only_behind_the_stores():
    """Every SQL statement of the product sits in db.py, store.py or logstore.py, so labd can put a
    second store behind the same methods: no string literal elsewhere reads like SQL."""
    root = Path(__file__).resolve().parents[2]
    sql = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|PRAGMA)\b",
                     re.S)
    homes = {"bastion_app/db.py", "bastion_app/store.py", "bastion_app/logstore.py"}
    found = []
    for pkg in ("bastion_app", "labcore", "labctl", "plugins"):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in homes:
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value):
                    found.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
    assert not found, "SQL outside the stores:\n" + "\n".join(found)
    assert sql.search("SELECT count(*) FROM machines")  # the probe itself finds SQL


def test_requeue_records_what_changed(store):
    store.discover(MAC, HW, ip=None)
    first = store.queue_install(MAC, PARAMS, actor="op")
    assert first["state"] == "install_queued"
    assert "changed" not in store.events(MAC)[-1]["data"]  # a first install changes nothing
    store.queue_install(MAC, {**PARAMS, "role": "infra", "disk": "/dev/sda"}, actor="op")
    e = store.events(MAC)[-1]
    assert e["data"]["changed"] == {"role": ["worker", "infra"], "disk": ["", "/dev/sda"]}
    assert e["reason"] == "install queued; role worker -> infra, disk (auto) -> /dev/sda"
    store.queue_install(MAC, {**PARAMS, "role": "infra", "disk": "/dev/sda"}, actor="op", reason="same again")
    assert "changed" not in store.events(MAC)[-1]["data"] and store.events(MAC)[-1]["reason"] == "same again"
    token = store.require(MAC)["install_token"]
    store.progress(MAC, token=token, stage="complete", percent=100, message="", ip=None)
    store.reprovision(MAC, {"os": "ubuntu-26.04"}, actor="op", reason="new kernel")
    e = store.events(MAC)[-1]
    assert (e["kind"], e["data"]) == ("reprovision", {"os": "ubuntu-26.04", "changed": {"os": ["fedora-43", "ubuntu-26.04"]}})
    assert e["reason"] == "new kernel; os fedora-43 -> ubuntu-26.04"


def test_pages_are_bounded_in_machines_and_bytes_and_hardware_is_counted(store):
    hw = {"dmi": {"product": "p" * 1000}}
    for i in range(10):
        store.discover(synthetic_mac(i), hw, ip=f"10.0.1.{i}")
    size = len(json.dumps(hw))
    assert store.hardware_bytes() == 10 * size  # kept by the triggers
    first = store.list(limit=4)
    assert [m["mac"] for m in first] == [synthetic_mac(i) for i in range(4)]
    rest = store.list(after=(first[-1]["hostname"], first[-1]["mac"]), limit=100)
    assert [m["mac"] for m in rest] == [synthetic_mac(i) for i in range(4, 10)]
    assert len(store.list(limit=100, max_bytes=3 * size)) == 3
    store.forget(synthetic_mac(0), actor="t")
    assert store.hardware_bytes() == 9 * size
    with pytest.raises(Full):
        store.discover(synthetic_mac(99), hw, ip="10.0.1.99", max_hardware_total=9 * size + 10)
    with pytest.raises(Full):
        store.discover(synthetic_mac(99), {}, ip="10.0.1.99", max_machines=9)
    with pytest.raises(Forbidden):  # a known machine from another address
        store.discover(synthetic_mac(1), {}, ip="10.0.9.9")
    assert store.get(synthetic_mac(1))["hardware"] == hw


def test_bmc_records_and_the_sealed_value_is_bound_to_its_machine(store, tmp_path):
    from labcore import secretbox

    store.discover(MAC, HW, ip="10.0.0.9")
    store.discover("52:54:00:00:00:02", HW, ip="10.0.0.10")
    key = secretbox.load_or_create_key(tmp_path / "secret.key")
    sealed = secretbox.seal(key, b'{"username": "u", "password": "p"}', f"bmc:{MAC}".encode())
    store.set_bmc(MAC, {"driver": "redfish", "address": "10.0.0.1", "credentials": sealed}, actor="op")
    # a discovery hint never replaces what an operator set
    store.set_bmc(MAC, {"driver": "ipmi", "address": None}, actor="machine", source="discovery")
    b = store.get_bmc(MAC)
    assert (b["driver"], b["source"], b["credentials"]) == ("redfish", "operator", sealed)
    # the sealed credentials do not open for another machine
    with pytest.raises(secretbox.SecretError):
        secretbox.unseal(key, sealed, b"bmc:52:54:00:00:00:02")
    ev = [e for e in store.events(MAC) if e["kind"] == "bmc_set"]
    assert len(ev) == 1 and sealed not in json.dumps(ev)
    store.forget(MAC, actor="op")
    assert store.get_bmc(MAC) is None
