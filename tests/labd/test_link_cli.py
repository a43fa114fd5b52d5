"""labctl through labd to joined bastions (issue 17), through the real click command tree: a
`labctl login` home, a real `labd serve` (API + hub) of this module's own, two real `lab-bastion
serve` joined with `lab-bastion join`, shared by every test here.

Routed provisioning commands reach the bastion that holds the MAC and answer its answer with
labctl's exit codes; a MAC seen by both bastions needs --bastion; an offline bastion is refused
(exit 3) unless --queue; --bmc-* and --power are refused through labd; `labctl provision logs
[-f]` reads the log on the bastion through the link and prints what it prints against the bastion;
`labctl get bastions` shows each bastion's connection state, machines, lag, last seen, version.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.support import Machines, labctl, logged_in, serve_labd, start_bastion, wait_for
from tests.support import fleet_mac as mac
from tests.support import labd_bastion_join as join
from tests.support import labd_sql as db

PER_BASTION = 8
SHARED = mac(1, 7)  # b1's, and b2 sees it too
INSTALL = ("--role", "worker", "--os", "debian-12")


@pytest.fixture(scope="module")
def labd(postgres, tmp_path_factory):
    yield from serve_labd(postgres, tmp_path_factory, "labd_link_cli")


@pytest.fixture(scope="module")
def admin(labd):
    return labd.session(labd.login())


@pytest.fixture(scope="module")
def fleet(labd, admin, tmp_path_factory):
    """b1 (lab1/dev) and b2 (lab1/prod), joined and serving; machines mac(b, 0..7) discovered on
    each, SHARED also on b2; everything replicated to labd."""
    root = tmp_path_factory.mktemp("cli-fleet")
    started = {}
    try:  # the bastions are stopped even when the setup fails half-way
        for i, env in ((1, "dev"), (2, "prod")):
            r = join(labd, admin, root / f"b{i}", f"b{i}", extra=("--cloud", "lab1", "--environment", env))
            assert r.returncode == 0, r.stderr
            started[f"b{i}"] = start_bastion(root / f"b{i}", workers=1)
        for i, b in enumerate(started.values(), 1):
            m = Machines(b)
            for j in range(PER_BASTION):
                m.discover(mac(i, j))
        Machines(started["b2"]).discover(SHARED)

        def replicated():
            with db(labd) as c:
                return c.execute("SELECT count(*) FROM server_claims").fetchone()[0] == 2 * PER_BASTION + 1
        wait_for(replicated, timeout=60, what="both bastions replicated")
        yield started
    finally:
        for b in started.values():
            b.stop()


@pytest.fixture(scope="module")
def home(labd, tmp_path_factory):
    """A `labctl login` to labd (its CA pinned): a labd context, no bastion."""
    d = tmp_path_factory.mktemp("labctl-home")
    env = {"LABCTL_HOME": str(d), "LABCTL_CONFIG": str(d / "config.yaml"), "LABCTL_BASTION_URL": "",
           "LABCTL_TOKEN": "", "LABCTL_OUTPUT": "", "LABCTL_CONTEXT": "", "LABCTL_LABD_URL": ""}
    return logged_in(env, labd)


def on_bastion(b, target: str) -> dict:
    r = b.session().get(b.url + f"/api/machines/{target}")
    return r.json() if r.status_code == 200 else {"status": r.status_code}


def bastion_env(home: dict, b) -> dict:
    """The same user against the bastion itself (a bastion named: labd is not used)."""
    return {**home, "LABCTL_BASTION_URL": b.url, "LABCTL_TOKEN": b.token}


def installing(b, i: int, j: int, hostname: str) -> str:
    """Queue and boot machine j of bastion i through the bastion's own API; its install token."""
    r = b.session().post(b.url + "/api/install", json={"mac": mac(i, j), "hostname": hostname, "role": "worker",
                                                        "os": "debian-12", "disk": "", "ssh_keys": []})
    assert r.status_code == 202, r.text
    return Machines(b).boot(mac(i, j))


# -- routed provisioning commands -----------------------------------------------------------------------
def test_install_cancel_debug_forget_reach_the_bastion_that_holds_the_machine(labd, fleet, home):
    b1, b2 = fleet["b1"], fleet["b2"]
    r = labctl(home, "provision", "install", mac(2, 1), "--hostname", "cli-1", *INSTALL)
    assert r.exit_code == 0, r.output
    assert f"{mac(2, 1)}: debian-12 as worker queued" in r.output
    m = on_bastion(b2, mac(2, 1))
    assert (m["state"], m["hostname"]) == ("install_queued", "cli-1")
    assert on_bastion(b1, mac(2, 1)) == {"status": 404}

    r = labctl(home, "provision", "debug", mac(1, 1), "--mode", "rescue")
    assert r.exit_code == 0, r.output
    assert on_bastion(b1, mac(1, 1))["debug"] == "rescue"

    # cancel by host name, once labd has the name from b2
    wait_for(lambda: labctl(home, "get", "servers", "cli-1").exit_code == 0, timeout=30, what="cli-1 in labd")
    r = labctl(home, "provision", "cancel", "cli-1", "--reason", "not now", "-o", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["state"] == "discovered" and on_bastion(b2, mac(2, 1))["state"] == "discovered"

    r = labctl(home, "provision", "forget", mac(2, 2))
    assert r.exit_code == 0, r.output
    assert on_bastion(b2, mac(2, 2)) == {"status": 404}


def test_reprovision_no_reboot_is_queued_on_the_bastion(labd, fleet, home):
    b1 = fleet["b1"]
    token = installing(b1, 1, 2, "cli-re")
    Machines(b1).progress(mac(1, 2), token, "complete", 100)
    assert on_bastion(b1, mac(1, 2))["state"] == "installed"
    r = labctl(home, "provision", "reprovision", mac(1, 2), "--no-reboot", "--reason", "refresh")
    assert r.exit_code == 0, r.output
    assert on_bastion(b1, mac(1, 2))["state"] == "install_queued"
    # without --no-reboot labd cannot reboot it (no SSH from labd): refused before anything is sent
    r = labctl(home, "provision", "reprovision", mac(1, 3))
    assert r.exit_code == 2 and "--no-reboot" in r.output and on_bastion(b1, mac(1, 3))["state"] == "discovered"


def test_the_bastions_refusals_come_back_unchanged_with_labctls_exit_codes(labd, fleet, home):
    b2 = fleet["b2"]
    assert labctl(home, "provision", "install", mac(2, 3), "--hostname", "cli-taken", *INSTALL).exit_code == 0
    # the host name is taken on b2: its 409, word for word, exit 6
    direct = b2.session().post(b2.url + "/api/install", json={"mac": mac(2, 4), "hostname": "cli-taken", "role": "worker",
                                                               "os": "debian-12", "disk": "", "ssh_keys": []})
    assert direct.status_code == 409
    r = labctl(home, "provision", "install", mac(2, 4), "--hostname", "cli-taken", *INSTALL)
    assert r.exit_code == 6 and direct.json()["error"] in r.output, r.output
    assert on_bastion(b2, mac(2, 4))["state"] == "discovered"
    # cancel of a machine that is not installing: the bastion's 409
    r = labctl(home, "provision", "cancel", mac(2, 5))
    assert r.exit_code == 6, r.output
    # a MAC no bastion holds: labd's 404, exit 5
    r = labctl(home, "provision", "debug", "52:54:ff:00:00:01", "--mode", "rescue")
    assert r.exit_code == 5 and "no bastion holds this machine" in r.output


def test_a_mac_seen_by_two_bastions_needs_bastion(labd, fleet, home):
    r = labctl(home, "provision", "debug", SHARED, "--mode", "rescue")
    assert r.exit_code == 6 and "seen by bastions b1, b2: name one (--bastion)" in r.output, r.output
    assert on_bastion(fleet["b1"], SHARED).get("debug") in (None, "") and on_bastion(fleet["b2"], SHARED).get("debug") in (None, "")
    r = labctl(home, "provision", "debug", SHARED, "--mode", "rescue", "--bastion", "b2")
    assert r.exit_code == 0, r.output
    assert on_bastion(fleet["b2"], SHARED)["debug"] == "rescue"
    assert on_bastion(fleet["b1"], SHARED).get("debug") in (None, "")
    r = labctl(home, "provision", "debug", SHARED, "--mode", "rescue", "--bastion", "b9")
    assert r.exit_code == 5 and "bastion b9 does not hold" in r.output


def test_bmc_and_power_are_refused_through_labd(labd, fleet, home):
    r = labctl(home, "provision", "install", mac(1, 4), "--hostname", "cli-bmc", *INSTALL, "--bmc-driver", "ipmi",
               "--bmc-address", "10.0.0.9", "--bmc-username", "admin", "--bmc-password-stdin", input="secret")
    assert r.exit_code == 2 and "--bmc-* needs a bastion context" in r.output and "labctl power set" in r.output
    r = labctl(home, "provision", "reprovision", mac(1, 4), "--power")
    assert r.exit_code == 2 and "--power needs a bastion context" in r.output
    assert on_bastion(fleet["b1"], mac(1, 4))["state"] == "discovered"  # nothing was sent
    # --bastion/--queue without a labd: a usage error
    r = labctl(bastion_env(home, fleet["b1"]), "provision", "debug", mac(1, 4), "--mode", "rescue", "--bastion", "b1")
    assert r.exit_code == 2 and "route a command through labd" in r.output


# -- logs through the link --------------------------------------------------------------------------------
def test_provision_logs_through_labd_prints_what_the_bastion_prints(labd, fleet, home):
    b2 = fleet["b2"]
    token = installing(b2, 2, 6, "cli-logs")
    Machines(b2).log(mac(2, 6), token, *(f"line {n} of cli-logs" for n in range(1, 6)))
    via_bastion = labctl(bastion_env(home, b2), "provision", "logs", mac(2, 6))
    assert via_bastion.exit_code == 0 and "line 5 of cli-logs" in via_bastion.output
    r = labctl(home, "provision", "logs", mac(2, 6))
    assert r.exit_code == 0, r.output
    assert r.output == via_bastion.output
    r = labctl(home, "provision", "logs", mac(2, 6), "--tail", "2")
    assert r.exit_code == 0 and r.output == labctl(bastion_env(home, b2), "provision", "logs", mac(2, 6), "--tail", "2").output
    assert [ln.split(" ", 1)[1] for ln in r.output.splitlines()] == ["line 4 of cli-logs", "line 5 of cli-logs"]
    doc = json.loads(labctl(home, "provision", "logs", mac(2, 6), "-o", "json").output)
    assert doc["bastion"] == "b2" and [x["text"] for x in doc["lines"]][-1] == "line 5 of cli-logs"
    # a machine the bastion has no log of: its 404, exit 5
    r = labctl(home, "provision", "logs", mac(2, 7))
    assert r.exit_code == 0 and r.output == ""  # known machine, no lines yet: nothing, like the bastion
    r = labctl(home, "provision", "logs", "52:54:ff:00:00:02")
    assert r.exit_code == 5


def test_provision_logs_follow_through_labd_until_installed(labd, fleet, home):
    b1 = fleet["b1"]
    token = installing(b1, 1, 5, "cli-follow")
    ms = Machines(b1)
    ms.log(mac(1, 5), token, "before the follow")

    def install():
        time.sleep(1.5)
        ms.progress(mac(1, 5), token, "partitioning", 20, "disks")
        ms.log(mac(1, 5), token, "during the follow")
        time.sleep(0.3)
        ms.progress(mac(1, 5), token, "complete", 100, "all done")
    t = threading.Thread(target=install)
    t.start()
    started = time.monotonic()
    r = labctl(home, "provision", "logs", mac(1, 5), "-f")
    t.join()
    assert r.exit_code == 0, r.output
    out = r.output
    assert "before the follow" in out and "during the follow" in out and "==> partitioning: disks" in out
    assert "state: installing -> installed" in out and out.rstrip().endswith(f"{mac(1, 5)} installed")
    assert time.monotonic() - started < 20


def test_provision_logs_follow_of_a_failed_install_exits_7(labd, fleet, home):
    b1 = fleet["b1"]
    token = installing(b1, 1, 6, "cli-fails")
    ms = Machines(b1)
    threading.Timer(1.0, lambda: ms.progress(mac(1, 6), token, "failed", None, "disk on fire")).start()
    r = labctl(home, "provision", "logs", mac(1, 6), "-f")
    assert r.exit_code == 7 and "install ended failed" in r.output, r.output


def test_a_cancelled_follow_stops_on_the_bastion(labd, admin, fleet):
    """Ctrl-C in labctl cancels the logs command (labctl/remote.py): the bastion stops streaming."""
    b2 = fleet["b2"]
    token = installing(b2, 2, 7, "cli-cancel")
    ms = Machines(b2)
    ms.log(mac(2, 7), token, "first")
    made = admin.post(labd.url + f"/api/v1/servers/{mac(2, 7)}/logs", json={"follow": True}).json()
    cid = made["command"]

    def rows():
        return admin.get(labd.url + f"/api/v1/commands/{cid}").json()["output"]
    wait_for(lambda: any(r["data"].get("text") == "first" for r in rows()), timeout=20, what="the first line")
    ms.log(mac(2, 7), token, "second")
    wait_for(lambda: any(r["data"].get("text") == "second" for r in rows()), timeout=20, what="a live line")
    assert admin.post(labd.url + f"/api/v1/commands/{cid}/cancel").json()["state"] == "cancelled"
    time.sleep(1.5)  # the hub sends cancel within 0.2 s; the bastion's follow looks at it at once
    ms.log(mac(2, 7), token, "after the cancel")
    time.sleep(1.5)
    assert not any(r["data"].get("text") == "after the cancel" for r in rows())


# -- offline bastions (last: it restarts b1) -------------------------------------------------------------
def test_a_follow_whose_bastion_goes_away_ends_with_its_error(labd, fleet, home):
    """`labctl provision logs -f` via labd while the bastion streaming it stops: the hub fails the
    logs command ("bastion b1 disconnected", 503) and labctl exits with that error, not hanging."""
    b = fleet["b1"]
    token = installing(b, 1, 3, "cli-gone")
    Machines(b).log(mac(1, 3), token, "before the bastion goes")
    got = {}
    t = threading.Thread(target=lambda: got.update(r=labctl(home, "provision", "logs", mac(1, 3), "-f")))
    started = time.monotonic()
    t.start()
    try:
        def streaming():
            with db(labd) as c:
                return c.execute("SELECT count(*) FROM command_output o JOIN commands c ON c.id = o.command_id "
                                 "WHERE c.kind = 'logs' AND c.state = 'sent' AND o.data->>'text' = %s",
                                 ("before the bastion goes",)).fetchone()[0] > 0
        wait_for(streaming, timeout=30, what="the follow streaming")
        b.stop()
        t.join(timeout=60)
        assert not t.is_alive(), "labctl still following a bastion that went away"
        r = got["r"]
        assert r.exit_code != 0 and "bastion b1 disconnected" in r.output, r.output
        assert "before the bastion goes" in r.output
        assert time.monotonic() - started < 60
    finally:
        if b.proc.poll() is not None:
            fleet["b1"] = start_bastion(b.data_dir, workers=1)


def test_an_offline_bastion_is_refused_unless_queue_then_delivered_at_reconnect(labd, fleet, home):
    b = fleet["b1"]
    b.stop()
    try:
        wait_for(lambda: '"offline"' in labctl(home, "get", "bastion", "b1", "-o", "json").output, timeout=30,
                 what="b1 offline")
        r = labctl(home, "provision", "debug", mac(1, 0), "--mode", "rescue")
        assert r.exit_code == 3 and "bastion b1 offline since 20" in r.output and "--queue" in r.output, r.output
        r = labctl(home, "provision", "logs", mac(1, 0))
        assert r.exit_code == 3 and "bastion b1 offline since" in r.output
        r = labctl(home, "provision", "debug", mac(1, 0), "--mode", "rescue", "--queue", "-o", "json")
        assert r.exit_code == 0, r.output
        queued = json.loads(r.output)
        assert queued["state"] == "queued" and queued["bastion"] == "b1"
    finally:
        fleet["b1"] = b = start_bastion(b.data_dir, workers=1)
    wait_for(lambda: on_bastion(b, mac(1, 0)).get("debug") == "rescue", timeout=30, what="delivered at reconnect")


def test_get_bastions_shows_state_machines_lag_last_seen_and_version(labd, fleet, home):
    wait_for(lambda: '"online"' in labctl(home, "get", "bastion", "b1", "-o", "json").output, timeout=30, what="b1 back")
    r = labctl(home, "get", "bastions")
    assert r.exit_code == 0, r.output
    head, *rows = r.output.splitlines()
    assert head.split() == ["NAME", "CLOUD", "ENV", "STATUS", "MACHINES", "LAG", "LAST", "SEEN", "VERSION"]
    b2 = next(x.split() for x in rows if x.startswith("b2 "))
    assert b2[:6] == ["b2", "lab1", "prod", "online", str(PER_BASTION), "0"]  # mac(2, 2) forgotten, SHARED seen
    doc = json.loads(labctl(home, "get", "bastions", "-o", "json").output)
    items = doc["bastions"] if isinstance(doc, dict) else doc
    by = {x["name"]: x for x in items}
    assert by["b2"]["machines"] == PER_BASTION and by["b2"]["lag"] == 0 and by["b2"]["version"]
    assert by["b1"]["machines"] == PER_BASTION and by["b1"]["status"] == "online"
    wide = labctl(home, "get", "bastions", "-o", "wide").output
    assert "ID" in wide.splitlines()[0] and by["b1"]["id"] in wide
