"""Syslog message parsing (RFC 3164, RFC 5424, malformed, oversized, non-UTF-8) and the
sender-resolution tables (dnsmasq leases)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion_app.logstore import MAX_TEXT
from bastion_app.syslog import clean, parse, read_leases


def test_rfc3164_with_host_and_tag():
    m = parse(b"<30>Nov 26 12:00:01 anaconda-host anaconda[1234]: Configuring storage")
    assert (m.rfc, m.facility, m.severity, m.host, m.app, m.text) == (
        "3164", 3, "info", "anaconda-host", "anaconda", "Configuring storage")


def test_rfc3164_single_digit_day_and_no_pid():
    m = parse(b"<11>Jan  5 01:02:03 node1 program: disk error\n")
    assert (m.severity, m.host, m.app, m.text) == ("err", "node1", "program", "disk error")


def test_rsyslog_forward_with_rfc3339_timestamp():
    m = parse(b"<134>2026-11-26T12:00:00.123456+00:00 localhost anaconda: Installing bash-5.2 (10/100)")
    assert (m.facility, m.severity, m.host, m.app) == (16, "info", "localhost", "anaconda")
    assert m.text == "Installing bash-5.2 (10/100)"


def test_rfc3164_tag_without_host():
    m = parse(b"<13>kernel: eth0 link up")
    assert (m.host, m.app, m.text, m.severity) == ("", "kernel", "eth0 link up", "notice")


def test_rfc5424_full():
    raw = '<165>1 2026-11-26T12:00:00.003Z host1 anaconda 42 ID47 [exampleSDID@32473 iut="3" eventSource="App\\]x"] \ufeffpackage step'
    m = parse(raw.encode())
    assert (m.rfc, m.facility, m.severity, m.host, m.app, m.text) == ("5424", 20, "notice", "host1", "anaconda", "package step")


def test_rfc5424_nil_fields_and_no_msg():
    m = parse(b"<14>1 - - - - - -")
    assert (m.rfc, m.host, m.app, m.text) == ("5424", "", "", "")
    m = parse(b"<14>1 - - curtin - - - hello world")
    assert (m.app, m.text) == ("curtin", "hello world")


@pytest.mark.parametrize("raw", [
    b"", b"no header at all", b"<999>too big a priority", b"<>empty", b"<14", b"<14>1 short",
    b"<14>1 2026 h a p m [unterminated sd", b"\xff\xfe\x00garbage",
])
def test_malformed_is_kept_whole(raw):
    m = parse(raw)
    assert m.rfc in ("raw", "3164")
    assert isinstance(m.text, str)
    if raw.startswith(b"<999>") or not raw.startswith(b"<"):
        assert m.rfc == "raw" and m.severity == "notice"


def test_non_utf8_is_replaced_not_dropped():
    m = parse(b"<30>Nov 26 12:00:01 h app: caf\xe9 \xff\xfe end")
    assert m.text == "caf\ufffd \ufffd\ufffd end"


def test_control_characters_are_escaped():
    m = parse(b"<30>Nov 26 12:00:01 h app: red \x1b[31mALERT\x1b[0m\x07 tab\tok")
    assert m.text == "red \\x1b[31mALERT\\x1b[0m\\x07 tab\tok"
    assert clean("\x9b2J") == "\\x9b2J"


def test_oversized_is_truncated_with_marker():
    body = b"x" * 60000
    m = parse(b"<30>Nov 26 12:00:01 h app: " + body)
    assert len(m.text) < MAX_TEXT + 100
    assert m.text.startswith("x" * MAX_TEXT)
    assert m.text.endswith(f" [... {60000 - MAX_TEXT} more characters cut]")


@given(st.binary(max_size=2000))
def test_parse_never_raises(data):
    m = parse(data)
    assert len(m.text) <= MAX_TEXT + 100
    assert m.severity in ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
    assert "\x1b" not in m.text and "\x00" not in m.text


def test_dnsmasq_leases(tmp_path):
    f = tmp_path / "dnsmasq.leases"
    f.write_text(
        "4102444800 52:54:00:AA:bb:01 10.0.0.5 node1 01:52:54:00:aa:bb:01\n"
        "4102444800 not-a-mac 10.0.0.6 * *\n"
        "duid 00:01:00:01:2c:7e\n"
        "4102444800 52-54-00-aa-bb-02 10.0.0.7 * *\n"
    )
    assert read_leases(f) == {"10.0.0.5": "52:54:00:aa:bb:01", "10.0.0.7": "52:54:00:aa:bb:02"}
    assert read_leases(tmp_path / "missing") == {}


def test_resolver_order_and_fresh_machines(tmp_path):
    """Leases beat the store's last-known address; a machine the store just learned about is
    found without waiting for the next table refresh; unknown senders resolve to None."""
    from bastion_app.store import Store
    from bastion_app.syslog import Resolver

    store = Store(tmp_path / "state.db")
    store.discover("52:54:00:aa:00:01", {}, ip="10.9.0.5")
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text("4102444800 52:54:00:aa:00:02 10.9.0.5 * *\n")
    r = Resolver(store, leases, refresh_s=3600)
    assert r.resolve("10.9.0.5") == "52:54:00:aa:00:02"
    assert r.resolve("10.9.0.77") is None
    store.discover("52:54:00:aa:00:03", {}, ip="10.9.0.6")  # after the tables were read
    assert r.resolve("10.9.0.6") == "52:54:00:aa:00:03"
