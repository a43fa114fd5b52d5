"""Install logs end to end: real UDP (and TCP) syslog datagrams to a running `lab-bastion serve`,
read back through the API; /api/log, the subiquity webhook, the per-machine bound, a restart.

Senders are told apart by their loopback source address (127.0.0.21, .22, ...): one machine is
known through the dnsmasq lease file, one through the address it used to call the bastion, and an
unknown one lands in the `unattributed` bucket.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

from tests.support import free_syslog_port, installing, send_udp, start_bastion, udp_port, wait_for

MAC_LEASE = "52:54:00:10:00:21"  # known from the lease file as 127.0.0.21
MAC_SEEN = "52:54:00:10:00:22"  # known because it called the bastion from 127.0.0.22
MAC_UBUNTU = "52:54:00:10:00:23"


def logs(b, mac: str, **params) -> dict:
    r = requests.get(f"{b.url}/api/logs/{mac}", headers=b.headers, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def texts(b, mac: str) -> list[str]:
    return [line["text"] for line in logs(b, mac, limit=5000)["lines"]]


def write_leases(data_dir: Path, entries: dict[str, str]) -> None:
    run = data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    exp = int(time.time()) + 3600
    (run / "dnsmasq.leases").write_text("".join(f"{exp} {mac} {ip} * *\n" for ip, mac in entries.items()))


# -- the module's bastion ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    data = tmp_path_factory.mktemp("logs") / "data"
    write_leases(data, {"127.0.0.21": MAC_LEASE})
    b = start_bastion(data, "--syslog-port", str(free_syslog_port()), workers=2,
                      env={"LAB_BASTION_LOG_LINES": "100"})
    yield b
    b.stop()


def test_syslog_both_rfcs_malformed_oversized_non_utf8(srv):
    installing(srv, MAC_LEASE, "logs-lease", source="127.0.0.21")  # the leased address speaks for it
    port = udp_port(srv)
    send_udp(port,
             b"<30>Nov 26 12:00:01 localhost anaconda[1234]: rfc3164 line",
             "<165>1 2026-11-26T12:00:00.003Z host1 anaconda 42 ID47 [x@1 a=\"b\"] \ufeffrfc5424 line".encode(),
             b"no header at all, just text",
             b"<30>Nov 26 12:00:02 localhost anaconda: non-utf8 caf\xe9 \xff end",
             b"<30>Nov 26 12:00:03 localhost anaconda: big " + b"y" * 60000,
             b"<30>Nov 26 12:00:04 localhost anaconda: escape \x1b[31mred",
             source="127.0.0.21")
    got = wait_for(lambda: (t := texts(srv, MAC_LEASE)) and len(t) >= 6 and t, timeout=30, what="6 stored lines")
    assert got[:4] == ["rfc3164 line", "rfc5424 line", "no header at all, just text", "non-utf8 caf\ufffd \ufffd end"]
    assert got[4].startswith("big yyyy") and "more characters cut" in got[4] and len(got[4]) < 9000
    assert got[5] == "escape \\x1b[31mred"
    page = logs(srv, MAC_LEASE)
    first = page["lines"][0]
    assert (first["source"], first["severity"], first["app"], first["host"], first["ip"]) == (
        "syslog", "info", "anaconda", "localhost", "127.0.0.21")
    assert page["lines"][1]["severity"] == "notice" and page["lines"][1]["host"] == "host1"


def test_tcp_framing(srv):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.21", 0))
        s.connect(("127.0.0.1", udp_port(srv)))
        s.sendall(b"<30>Nov 26 12:00:05 localhost anaconda: tcp newline framed\n"
                  b"46 <30>Nov 26 12:00:06 localhost anaconda: octets")
    wait_for(lambda: {"tcp newline framed", "octets"} <= set(texts(srv, MAC_LEASE)), timeout=30, what="tcp lines")


def test_sender_known_by_its_address_and_progress_from_lines(srv):
    installing(srv, MAC_SEEN, "logs-seen", source="127.0.0.22")
    send_udp(udp_port(srv), b"<30>Nov 26 12:00:01 localhost anaconda: Configuring storage", source="127.0.0.22")
    wait_for(lambda: logs(srv, MAC_SEEN)["stage"] == "partitioning", timeout=30, what="partitioning from syslog")
    send_udp(udp_port(srv), b"<30>Nov 26 12:00:02 localhost packaging: Installing bash-5.2 (50/100)", source="127.0.0.22")
    page = wait_for(lambda: (p := logs(srv, MAC_SEEN)) and p["stage"] == "packages" and p,
                    timeout=30, what="progress from syslog lines")
    assert [x["text"] for x in page["lines"]] == ["Configuring storage", "Installing bash-5.2 (50/100)"]
    assert page["percent"] == 47 and page["state"] == "installing"
    stages = [p["stage"] for p in page["progress"] if p["type"] == "progress"]
    assert stages[-2:] == ["partitioning", "packages"]
    # syslog never ends an install (it is unauthenticated)
    send_udp(udp_port(srv), b"<30>Nov 26 12:00:03 localhost anaconda: Thank you for installing", source="127.0.0.22")
    time.sleep(1)
    assert logs(srv, MAC_SEEN)["state"] == "installing"


def test_unknown_sender_goes_to_unattributed(srv):
    send_udp(udp_port(srv), b"<30>Nov 26 12:00:01 stranger app: who am i", source="127.0.0.99")
    page = wait_for(lambda: (p := logs(srv, "unattributed")) and p["lines"] and p, timeout=30, what="unattributed line")
    assert page["lines"][-1]["text"] == "who am i" and page["lines"][-1]["ip"] == "127.0.0.99"
    assert page["state"] is None


def test_post_log_needs_the_install_token(srv):
    token = installing(srv, "52:54:00:10:00:31", "logs-api")
    r = requests.post(srv.url + "/api/log", json={"mac": "52:54:00:10:00:31", "token": token,
                                                  "lines": ["from %post", "Running post-installation scripts"]}, timeout=10)
    assert r.status_code == 200 and r.json()["stored"] == 2
    page = logs(srv, "52:54:00:10:00:31")
    assert [x["text"] for x in page["lines"]] == ["from %post", "Running post-installation scripts"]
    assert page["lines"][0]["source"] == "api" and page["stage"] == "post-install"
    bad = requests.post(srv.url + "/api/log", json={"mac": "52:54:00:10:00:31", "token": "x" * 32, "lines": ["evil"]}, timeout=10)
    assert bad.status_code == 403
    assert requests.post(srv.url + "/api/log", json={"mac": "52:54:00:10:00:99", "token": "x" * 32, "lines": []},
                         timeout=10).status_code == 403  # an unknown MAC: the uniform answer
    assert requests.post(srv.url + "/api/log", data=b"{nope", timeout=10).status_code == 400
    assert requests.post(srv.url + "/api/log", json={"mac": "52:54:00:10:00:31", "token": token, "lines": ["a\x1bb"]},
                         timeout=10).status_code == 422
    assert "evil" not in texts(srv, "52:54:00:10:00:31")


def test_reading_needs_operator_token_and_valid_args(srv):
    assert requests.get(f"{srv.url}/api/logs/{MAC_LEASE}", timeout=10).status_code == 401
    assert requests.get(f"{srv.url}/api/logs/{MAC_LEASE}/follow", timeout=10).status_code == 401
    r = requests.get(f"{srv.url}/api/logs/not-a-mac", headers=srv.headers, timeout=10)
    assert r.status_code == 400
    assert requests.get(f"{srv.url}/api/logs/52:54:00:ff:ff:fe", headers=srv.headers, timeout=10).status_code == 404
    assert requests.get(f"{srv.url}/api/logs/{MAC_LEASE}?since=abc", headers=srv.headers, timeout=10).status_code == 400


def test_paging_with_since_cursor(srv):
    mac = "52:54:00:10:00:32"
    token = installing(srv, mac, "logs-page")
    assert requests.post(srv.url + "/api/log", json={"mac": mac, "token": token, "lines": [f"l{i}" for i in range(25)]},
                         timeout=10).ok
    seen, cursor = [], "0-0"
    for _ in range(10):
        page = logs(srv, mac, since=cursor, limit=10)
        seen += [x["text"] for x in page["lines"]]
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert seen == [f"l{i}" for i in range(25)]
    assert logs(srv, mac, since=cursor)["lines"] == []


def test_subiquity_webhook_maps_to_the_same_timeline(srv):
    token = installing(srv, MAC_UBUNTU, "logs-ubuntu", os_name="ubuntu-26.04")
    url = f"{srv.url}/api/installer-events/{MAC_UBUNTU}/{token}"
    for name, etype in [("subiquity/Install/install/partitioning", "start"), ("subiquity/Install/install/extract", "finish"),
                        ("subiquity/Install/install/postinstall", "start"), ("subiquity/Keyboard/apply", "start")]:
        r = requests.post(url, json={"name": name, "event_type": etype, "description": name.rsplit("/", 1)[1],
                                     "origin": "curtin", "level": "INFO", "result": "SUCCESS"}, timeout=10)
        assert r.status_code == 200, r.text
    page = logs(srv, MAC_UBUNTU)
    assert [p["stage"] for p in page["progress"] if p["type"] == "progress"][-3:] == ["partitioning", "packages", "post-install"]
    assert len(page["lines"]) == 4 and page["lines"][0]["source"] == "installer"
    assert requests.post(f"{srv.url}/api/installer-events/{MAC_UBUNTU}/{'y' * 32}", json={"name": "x"}, timeout=10).status_code == 403
    assert requests.post(url, data=b"[1,2]", timeout=10).status_code == 400
    r = requests.post(url, json={"name": "subiquity/x", "event_type": "start", "description": "a\x1b[2Jb", "origin": "o\x07"},
                      timeout=10)
    assert r.status_code == 200
    last = logs(srv, MAC_UBUNTU)["lines"][-1]
    assert last["text"] == "start subiquity/x: a\\x1b[2Jb" and last["app"] == "o\\x07"
    r = requests.post(url, json={"name": "subiquity/Shutdown/shutdown", "event_type": "start"}, timeout=10)
    assert r.json()["state"] == "installed"
    page = logs(srv, MAC_UBUNTU)
    assert page["state"] == "installed" and page["percent"] == 100
    assert requests.post(url, json={"name": "late", "event_type": "start"}, timeout=10).status_code == 403


def test_bounded_per_machine(srv):
    """LAB_BASTION_LOG_LINES=100 for this bastion: a flood keeps only about the newest 100."""
    send_udp(udp_port(srv), *[f"<30>Nov 26 12:00:01 h flood: n{i:04d}".encode() for i in range(400)], source="127.0.0.23")
    wait_for(lambda: "n0399" in texts(srv, "unattributed"), timeout=30, what="the last flood line")
    got = [t for t in texts(srv, "unattributed") if t.startswith("n")]
    assert 100 <= len(got) <= 110
    assert got[-1] == "n0399" and got == sorted(got)


def test_logs_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    write_leases(data, {"127.0.0.21": MAC_LEASE})
    port = free_syslog_port()
    b = start_bastion(data, "--syslog-port", str(port), workers=1)
    try:
        send_udp(port, b"<30>Nov 26 12:00:01 h anaconda: before restart", source="127.0.0.21")
        wait_for(lambda: texts(b, MAC_LEASE) == ["before restart"], timeout=30, what="stored line")
    finally:
        b.stop()
    b = start_bastion(data, "--syslog-port", str(port), workers=1)
    try:
        assert texts(b, MAC_LEASE) == ["before restart"]
    finally:
        b.stop()
