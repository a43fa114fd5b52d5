"""Validators: normalisation, rejection, and the property that nothing accepted can add a line."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labcore import validate as v
from tests.support import ED25519


@pytest.mark.parametrize("raw", ["52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef", "525400abcdef", "5254.00ab.cdef"])
def test_mac_normalised(raw):
    assert v.mac(raw) == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize("raw", ["", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:01:02", "zz:54:00:ab:cd:ef", "1", None, 5,
                                 "52:54:00:ab:cd:ef\n", "52:54:00:ab:cd:ef;reboot"])
def test_mac_rejected(raw):
    with pytest.raises(v.ValidationError):
        v.mac(raw)


@pytest.mark.parametrize("raw,expected", [("node1", "node1"), ("Node-01.lab.example", "node-01.lab.example"), ("a" * 63, "a" * 63)])
def test_hostname_ok(raw, expected):
    assert v.hostname(raw) == expected


@pytest.mark.parametrize("raw", ["", "-a", "a-", "a_b", "a b", "a\nb", "a;b", "$(id)", "a" * 64, "a..b", "a.", ".a",
                                 "x." * 127 + "x", "1.2.3.4", "node1\n", "%post"])
def test_hostname_rejected(raw):
    with pytest.raises(v.ValidationError):
        v.hostname(raw)


@pytest.mark.parametrize("raw", ["", None, "/dev/sda", "/dev/nvme0n1", "/dev/disk/by-id/nvme-Samsung_SSD_970_S46-part1", "/dev/vda"])
def test_disk_ok(raw):
    assert v.disk(raw) == (raw or "")


@pytest.mark.parametrize("raw", ["sda", "/dev/", "/dev/sda\n", "/dev/sda;rm -rf /", "/dev/$(id)", "/dev/../etc/passwd",
                                 "/dev/sd a", "/dev/'x'", "/dev/sda`x`"])
def test_disk_rejected(raw):
    with pytest.raises(v.ValidationError):
        v.disk(raw)


def test_ssh_key_pattern_reads_the_same_in_ecma262():
    import jsonschema

    schema = {"type": "string", "pattern": v.SSH_KEY_PATTERN}
    jsonschema.validate(ED25519 + " me@host", schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("ssh-rsa " + ED25519.split()[1], schema)


def test_ssh_key_ok_and_comment():
    assert v.ssh_key(ED25519 + " admin@laptop") == ED25519 + " admin@laptop"
    assert v.ssh_keys(ED25519 + "\n# comment\n") == [ED25519]


@pytest.mark.parametrize("suffix", ["\nrm -rf /", " a\nb", ' "quoted"', " $(id)", " a'b", " `x`"])
def test_ssh_key_injection_rejected(suffix):
    with pytest.raises(v.ValidationError):
        v.ssh_key(ED25519 + suffix)


def test_ssh_key_type_mismatch_and_garbage():
    blob = ED25519.split()[1]
    with pytest.raises(v.ValidationError, match="key data of that type"):
        v.ssh_key("ssh-rsa " + blob)
    with pytest.raises(v.ValidationError):
        v.ssh_key("ssh-ed25519 !!!notbase64")
    with pytest.raises(v.ValidationError):
        v.ssh_keys([ED25519] * (v.MAX_SSH_KEYS + 1))


def test_role_and_os():
    assert v.role("worker") == "worker"
    assert v.os_name("ubuntu-26.04") == "ubuntu-26.04"
    for bad in ("Worker", "master", ""):
        with pytest.raises(v.ValidationError):
            v.role(bad)
    with pytest.raises(v.ValidationError):
        v.os_name("fedora-42")


UNSAFE = set(string.whitespace) | set("\"'`$;&|<>(){}\\%#*?!")


def _accepts(fn, value):
    try:
        return fn(value)
    except v.ValidationError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_no_accepted_hostname_or_disk_or_mac_carries_unsafe_characters(s):
    for fn in (v.hostname, v.disk, v.mac, v.stage, v.token):
        out = _accepts(fn, s)
        if out is not None:
            assert not (set(out) & UNSAFE), (fn.__name__, out)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_no_accepted_ssh_key_has_a_line_break_or_quote(comment):
    out = _accepts(v.ssh_key, f"{ED25519} {comment}")
    if out is not None:
        assert "\n" not in out and "\r" not in out and "'" not in out and '"' not in out and "$" not in out


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,10}[a-z0-9])?){0,3}", fullmatch=True))
def test_valid_hostnames_round_trip(name):
    assert v.hostname(name) == name


def test_new_token_matches_the_pattern_and_never_begins_with_a_dash(monkeypatch):
    draws = iter(["-leading-dash-token-xyz", "--another-dashed-one-xx", "plain_token-1234567890"])
    monkeypatch.setattr(v.secrets, "token_urlsafe", lambda n: next(draws))
    assert v.new_token() == "plain_token-1234567890"
    monkeypatch.undo()
    for _ in range(500):  # a dash starts 1 draw in 64: unfiltered, 500 draws show one
        t = v.new_token()
        assert v.token(t) == t and not t.startswith("-")
    assert len(v.new_token(32)) == 43


@pytest.mark.parametrize("name", ["eth0", "enp3s0", "br-lab", "eth0.10", "vs_a@b", "lo", "a" * 15])
def test_interface_name_ok(name):
    assert v.interface_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a" * 16, "eth0:1", "eth 0", "eth0\nport=53", "a/b", 3, None])
def test_interface_name_rejected(name):
    with pytest.raises(v.ValidationError, match="not an interface name"):
        v.interface_name(name)


@pytest.mark.parametrize("value, driver, expected", [
    ("10.0.0.5", "redfish", (None, "10.0.0.5", None)),
    ("https://bmc-1.lab:8443", "redfish", ("https", "bmc-1.lab", 8443)),
    ("http://10.0.0.7:65535", "redfish", ("http", "10.0.0.7", 65535)),
    ("10.0.0.6:623", "ipmi", (None, "10.0.0.6", 623)),
    ("bmc7", "ipmi", (None, "bmc7", None)),
])
def test_bmc_address_accepts(value, driver, expected):
    assert v.bmc_address(value, driver) == expected


@pytest.mark.parametrize("value, driver", [
    ("https://10.0.0.5", "ipmi"), ("ftp://10.0.0.5", "redfish"), ("10.0.0.5/redfish", "redfish"),
    ("user@10.0.0.5", "redfish"), ("10.0.0.5:0", "ipmi"), ("10.0.0.5:70000", "ipmi"), ("[10.0.0.5]", "ipmi"),
    ("10.0.0.5 ", "ipmi"), ("10.0.0.5\n", "ipmi"), ("-bmc", "ipmi"), ("$(id)", "redfish"), ("", "ipmi"), (5, "ipmi"),
    ("999.1.1.1", "ipmi"), ("a" * 300, "ipmi"), ("[fd00::6]", "ipmi"), ("01.2.3.4", "ipmi"), ("1.2.3", "ipmi"),
    ("host:01", "ipmi"), ("bmc-.lab", "ipmi"),
])
def test_bmc_address_refuses(value, driver):
    with pytest.raises(v.ValidationError):
        v.bmc_address(value, driver)


def test_bmc_credentials_and_system_id():
    assert v.bmc_username("ADMIN.ops@lab") == "ADMIN.ops@lab"
    assert v.bmc_password("p a$$ w0rd!") == "p a$$ w0rd!"
    assert v.bmc_system_id("System.Embedded.1") == "System.Embedded.1"
    for fn, bad in [(v.bmc_username, "root;id"), (v.bmc_username, ""), (v.bmc_password, "pw\n"),
                    (v.bmc_password, "é"), (v.bmc_password, "x" * 129), (v.bmc_system_id, "../1"),
                    (v.bmc_system_id, "1/Actions")]:
        with pytest.raises(v.ValidationError) as exc:
            fn(bad)
        assert bad not in exc.value.message or bad == ""  # the refusal never echoes a secret
