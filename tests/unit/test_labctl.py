"""labctl's pure parts: target matching, the SSE parser, DHCP packets, /proc/net parsing, exit
codes, the config file, and that docs/cli.md and contrib/completions match the code."""

from __future__ import annotations

import io
import socket
import struct
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from labctl import config, docgen, doctor, errors, output, runner, targets
from labctl.client import iter_sse
from labctl.main import COMMANDS, cli
from tests.support import need

M = [
    {"mac": "52:54:00:00:00:01", "hostname": "node1", "ip": "10.0.0.1", "state": "installed"},
    {"mac": "52:54:00:00:00:02", "hostname": "node2.lab", "ip": "10.0.0.2", "state": "installed"},
    {"mac": "52:54:00:00:00:03", "hostname": "node2.dev", "ip": "10.0.0.3", "state": "installed"},
    {"mac": "52:54:00:00:00:04", "hostname": None, "ip": "10.0.0.3", "state": "discovered"},
    {"mac": "52:54:00:00:00:05", "hostname": "node1.lab", "ip": None, "state": "discovered"},
]


@pytest.mark.parametrize("target,macs", [
    ("node1", ["52:54:00:00:00:01"]),  # the exact name wins over node1.lab's short name
    ("node1.lab", ["52:54:00:00:00:05"]),
    ("NODE2.LAB", ["52:54:00:00:00:02"]),
    ("node2", ["52:54:00:00:00:02", "52:54:00:00:00:03"]),
    ("52-54-00-00-00-04", ["52:54:00:00:00:04"]),
    ("5254.0000.0002", ["52:54:00:00:00:02"]),
    ("10.0.0.3", ["52:54:00:00:00:03", "52:54:00:00:00:04"]),
    ("10.0.0.9", []),
    ("52:54:00:00:00:99", []),
    ("", []),
])
def test_match(target, macs):
    assert [m["mac"] for m in targets.match(M, target)] == macs


def test_resolve_errors_list_candidates():
    with pytest.raises(errors.UsageError) as e:
        targets.resolve(M, "node2")
    assert e.value.exit_code == 2 and "node2.lab (52:54:00:00:00:02" in e.value.message and "node2.dev" in e.value.message
    with pytest.raises(errors.NotFound) as e:
        targets.resolve(M, "nodee2.lab")
    assert e.value.exit_code == 5 and "node2.lab" in e.value.hint
    with pytest.raises(errors.NotFound) as e:
        targets.resolve([], "x")
    assert "knows no machines" in e.value.hint


class FakeRaw(io.BytesIO):
    pass


def _response(body: bytes) -> requests.Response:
    r = requests.Response()
    r.status_code = 200
    r.raw = FakeRaw(body)
    return r


def test_iter_sse_events_ids_multiline_and_heartbeats():
    body = (b"retry: 2000\n: following\n\n"
            b"id: 1-0\nevent: progress\ndata: {\"stage\":\"pxe\"}\n\n"
            b"event: log\ndata: line one\ndata: line two\nid: 1-1\n\n"
            b"id: 2-1\n: kind\n\n"
            b"data:no-space\n\n"
            b"event: end\ndata: {\"state\":\"installed\"}")  # no final blank line: still delivered
    evs = list(iter_sse(_response(body)))
    assert evs == [
        {"event": "heartbeat", "data": "following", "id": ""},
        {"event": "progress", "data": '{"stage":"pxe"}', "id": "1-0"},
        {"event": "log", "data": "line one\nline two", "id": "1-1"},
        {"event": "heartbeat", "data": "kind", "id": ""},
        {"event": "message", "data": "", "id": "2-1"},
        {"event": "message", "data": "no-space", "id": ""},
        {"event": "end", "data": '{"state":"installed"}', "id": ""},
    ]


def test_dhcp_discover_packet_and_offer_parsing():
    mac = bytes.fromhex("525400abcdef")
    pkt = doctor.discover_packet(mac, 0x12345678)
    assert pkt[0] == 1 and pkt[28:34] == mac and struct.unpack("!I", pkt[4:8])[0] == 0x12345678
    assert pkt[10:12] == b"\x80\x00" and pkt[236:240] == doctor.DHCP_MAGIC and pkt[240:243] == b"\x35\x01\x01"
    assert b"PXEClient:Arch:00000" in pkt and pkt.endswith(b"\xff")

    def offer(xid, yiaddr, server, extra=b"", file=b""):
        head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0, b"", socket.inet_aton(yiaddr),
                           b"", b"", mac.ljust(16, b"\0"), b"", file)
        return head + doctor.DHCP_MAGIC + b"\x35\x01\x02\x36\x04" + socket.inet_aton(server) + extra + b"\xff"

    r = doctor.parse_reply(offer(0x12345678, "10.0.0.50", "10.0.0.1"), 0x12345678)
    assert r == {"type": "OFFER", "server": "10.0.0.1", "offered_ip": "10.0.0.50", "pxe": False, "boot_file": ""}
    r = doctor.parse_reply(offer(0x12345678, "0.0.0.0", "10.0.0.2", b"\x3c\x09PXEClient", b"undionly.kpxe"), 0x12345678)
    assert r["offered_ip"] is None and r["pxe"] and r["boot_file"] == "undionly.kpxe"
    assert doctor.parse_reply(offer(1, "10.0.0.50", "10.0.0.1"), 2) is None  # another transaction
    assert doctor.parse_reply(pkt, 0x12345678) is None  # a request, not a reply
    assert doctor.parse_reply(b"\x02" * 100, 0) is None
    truncated = offer(7, "10.0.0.5", "10.0.0.1")[:-1] + b"\x3c\x40abc"  # option longer than the packet
    assert doctor.parse_reply(truncated, 7)["server"] == "10.0.0.1"


def test_bound_ports_reads_proc_net(tmp_path):
    hdr = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(hdr + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n"
                                  "   1: 0100007F:0016 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 2\n")
    (tmp_path / "udp").write_text(hdr + "  10: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 3\n")
    (tmp_path / "udp6").write_text(hdr + "  11: 00000000000000000000000000000000:1596 00000000000000000000000000000000:0000 07 0 0 0 0 0 4\n")
    assert doctor.bound_ports(tmp_path) == {("tcp", 8080), ("udp", 67), ("udp", 5526)}  # 22 is not listening


def test_playbook_exit_codes():
    assert runner.RunResult("successful", 0).exit_code == 0
    assert runner.RunResult("failed", 2).exit_code == 12
    assert runner.RunResult("failed", 4).exit_code == 14
    assert runner.RunResult("timeout", 254).exit_code == 9
    assert runner.RunResult("canceled", 254).exit_code == 9
    with pytest.raises(errors.PlaybookFailed) as e:
        runner.check(runner.RunResult("failed", 2, {"failed": 1}), "x")
    assert e.value.exit_code == 12


def test_config_precedence_and_file_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_CONFIG", str(tmp_path / "sub" / "c.yaml"))
    p = config.write_doc(config.Doc({"token": "t" * 20, "bastionUrl": "http://a:1"}))
    assert p.stat().st_mode & 0o777 == 0o600 and (p.parent.stat().st_mode & 0o777) == 0o700
    s = config.load({"bastionUrl": None}, env={"LABCTL_BASTION_URL": "http://b:2/"})
    assert s["bastionUrl"] == "http://b:2" and s.sources["bastionUrl"] == "env LABCTL_BASTION_URL"
    assert s["token"] == "t" * 20 and s.sources["token"].startswith("file ")
    assert s["output"] == "table" and s.sources["output"] == "default"
    s = config.load({"bastionUrl": "http://c:3", "output": "wide"}, env={"LABCTL_BASTION_URL": "http://b:2"})
    assert (s["bastionUrl"], s["output"], s.sources["output"]) == ("http://c:3", "wide", "flag")
    for key, bad in (("bastionUrl", "http://x/\nfoo: bar"), ("token", "two words"), ("output", "xml"), ("nope", "x")):
        with pytest.raises(errors.UsageError):
            config.check_value(key, bad)


def test_age_and_progress_text():
    from datetime import UTC, datetime

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert output.age("2026-01-02T03:04:00Z", now) == "5s"
    assert output.age("2026-01-02T02:00:00Z", now) == "1h"
    assert output.age("2025-12-20T00:00:00Z", now) == "13d"
    assert output.age(None, now) == "-"
    assert output.progress_text({"state": "installing", "stage": "packages", "percent": 40}) == "packages 40%"
    assert output.progress_text({"state": "failed", "failure": "stalled"}) == "failed: stalled"
    assert output.progress_text({"state": "installed", "stage": "complete"}) == ""


def test_every_registered_command_loads_and_has_help():
    r = CliRunner().invoke(cli, ["--help"])
    for name in COMMANDS:
        assert f"  {name} " in r.stdout
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_docs_cli_md_matches_the_help():
    assert docgen.DOC.read_text() == docgen.cli_md(), "docs/cli.md is stale: run `python -m labctl.docgen`"
    for code in errors.EXIT_CODES:
        assert f"| {code} |" in docgen.DOC.read_text()


def test_contrib_completions_match_click():
    for path, text in docgen.completion_files().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m labctl.docgen`"


def test_playbook_path_lookup(tmp_path, monkeypatch):
    (tmp_path / "mine.yml").write_text("- hosts: all\n")
    monkeypatch.setenv(runner.PLAYBOOK_DIRS_ENV, str(tmp_path))
    assert runner.playbook_path("mine.yml") == tmp_path / "mine.yml"
    with pytest.raises(errors.LabctlError) as e:
        runner.playbook_path("no-such-playbook.yml")
    assert str(tmp_path) in e.value.message and runner.PLAYBOOK_DIRS_ENV in e.value.hint
    assert runner.inventory({"n1": {"ansible_host": "10.0.0.5"}}) == {
        "all": {"children": {"targets": {"hosts": {"n1": {"ansible_host": "10.0.0.5"}}}}}}


def test_link_collection_points_at_the_checkout_and_replaces_a_stale_link(tmp_path):
    other = tmp_path / "old-clone"
    other.mkdir()
    link = tmp_path / "c" / "ansible_collections" / "lab" / "platform"
    assert runner.link_collection(tmp_path / "c", other) == tmp_path / "c"
    assert link.resolve() == other
    runner.link_collection(tmp_path / "c")  # the checkout labctl runs from replaces the old clone
    assert link.resolve() == runner.REPO and (link / "galaxy.yml").is_file()
    runner.link_collection(tmp_path / "c")  # idempotent
    assert link.resolve() == runner.REPO and [p.name for p in link.parent.iterdir()] == ["platform"]


def test_labctl_and_labcore_do_not_import_the_bastion():
    """labctl runs where no bastion is installed and labd will share labcore: no import of
    bastion_app (nor Flask, for labcore) anywhere in their modules, function bodies included."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for pkg, banned in (("labctl", {"bastion_app"}), ("labcore", {"bastion_app", "flask"})):
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{f.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def test_doctor_checks_the_boot_files_of_every_operating_system(tmp_path):
    from labcore import bastion_config
    from labcore.bastion_files import BOOT_ARTEFACTS
    from labcore.domain import OPERATING_SYSTEMS

    cfg = bastion_config.load(tmp_path, overrides={"dnsmasq": False}, env={}, detect=False)
    checks = {c.name: c for c in doctor.check_local(cfg, 8080)["artefacts"]}
    for o in OPERATING_SYSTEMS:
        files = ("rootfs.tar.zst", "rootfs.json") if o.installer == "image" else (o.kernel, o.initrd)
        assert BOOT_ARTEFACTS[o.name] == files
        assert f"missing {', '.join(files)}" in checks[f"artefacts {o.name}"].detail
        verb = "build-os" if o.installer == "image" else "sync --os"
        assert checks[f"artefacts {o.name}"].hint == f"lab-bastion images {verb} {o.name} --data-dir {tmp_path}"
    assert checks["artefacts installer"].hint == f"lab-bastion images build-installer --data-dir {tmp_path}"
    assert checks["artefacts discovery"].status == "fail" and checks["artefacts local-boot"].status == "warn"
    # every hint is a command to paste, no placeholder
    assert checks["artefacts discovery"].hint == f"lab-bastion images build-discovery --data-dir {tmp_path}"
    assert checks["artefacts local-boot"].hint == f"lab-bastion images build-local-boot --data-dir {tmp_path}"


def test_doctor_says_which_install_binding_holds(tmp_path):
    from labcore import bastion_config

    for over, status, name in (({"dnsmasq": False}, "warn", "first address"),
                               ({"dhcp_mode": "full", "dhcp_range": "10.0.0.100,10.0.0.199"}, "pass", "dhcp lease")):
        cfg = bastion_config.load(tmp_path, overrides=over, env={}, detect=False)
        (check,) = doctor.check_local(cfg, "http://127.0.0.1:8080")["binding"]
        assert check.status == status and check.detail.startswith(name + ":")


def _pe(cert_size: int, magic: int = 0x20B) -> bytes:
    """A minimal PE/COFF image: DOS stub pointing at the PE header, a COFF header, an optional
    header with 16 data directories, the Certificate Table (entry 4) ``cert_size`` bytes long."""
    dirs = 112 if magic == 0x20B else 96
    img = bytearray(0x40 + 24 + dirs + 16 * 8)
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, 0x40)
    img[0x40:0x44] = b"PE\0\0"
    opt = 0x40 + 24
    struct.pack_into("<H", img, opt, magic)
    struct.pack_into("<I", img, opt + dirs - 4, 16)
    struct.pack_into("<II", img, opt + dirs + 32, 0x400 if cert_size else 0, cert_size)
    return bytes(img)


def test_doctor_tells_whether_the_uefi_ipxe_binaries_are_signed(tmp_path):
    from labcore import bastion_config

    for name, data in (("signed.efi", _pe(0x100)), ("unsigned.efi", _pe(0)), ("pe32.efi", _pe(0x80, 0x10B)),
                       ("not-pe.efi", b"MZ" + bytes(100))):
        (tmp_path / name).write_bytes(data)
    assert [doctor.pe_signed(tmp_path / n) for n in ("signed.efi", "unsigned.efi", "pe32.efi", "not-pe.efi")] == [
        True, False, True, False]
    debian = Path("/usr/lib/ipxe/snponly.efi")  # Debian's iPXE, what the bastion serves
    need(debian.exists(), "needs Debian's ipxe package (/usr/lib/ipxe/snponly.efi)")
    assert not doctor.pe_signed(debian)

    cfg = bastion_config.load(tmp_path / "data", overrides={"dnsmasq": False}, env={}, detect=False)
    tftp = cfg.data_path / "tftp"
    tftp.mkdir(parents=True)
    check = lambda: {c.name: c for c in doctor.check_local(cfg, 8080)["tftp"]}["secure boot"]  # noqa: E731
    assert check().status == "skip"
    (tftp / "snponly.efi").write_bytes(debian.read_bytes())
    (tftp / "ipxe.efi").write_bytes(_pe(0x100))
    c = check()
    assert c.status == "warn" and c.detail.startswith("snponly.efi unsigned: UEFI machines with Secure Boot on")
    assert "Secure Boot off" in c.hint
    (tftp / "snponly.efi").write_bytes(_pe(0x200))
    assert check().status == "pass"


def test_collection_lookup_order(tmp_path, monkeypatch):
    """A checkout runs itself; without one (an installed wheel), a lab.platform on
    ANSIBLE_COLLECTIONS_PATH wins over the copy that ships in the wheel; none at all is a clear error."""
    monkeypatch.setattr(runner.config, "home", lambda: tmp_path / "home")
    assert (runner.collection_base() / runner.COLLECTION).resolve() == runner.REPO  # this checkout
    monkeypatch.setattr(runner, "REPO", tmp_path / "site-packages")  # as installed: no galaxy.yml next to labctl
    installed, bundled = tmp_path / "installed", tmp_path / "bundled"
    for base in (installed, bundled):
        (base / runner.COLLECTION / "playbooks").mkdir(parents=True)
        (base / runner.COLLECTION / "playbooks" / "reprovision.yml").write_text("---\n")
    monkeypatch.setattr(runner, "BUNDLED", bundled)
    monkeypatch.setenv("ANSIBLE_COLLECTIONS_PATH", f"{tmp_path / 'elsewhere'}:{installed / 'ansible_collections'}")
    assert runner.collection_base() == installed
    assert runner.playbook_path("reprovision.yml") == installed / runner.COLLECTION / "playbooks" / "reprovision.yml"
    assert runner.collections_env()["ANSIBLE_COLLECTIONS_PATH"].split(":")[0] == str(installed)
    monkeypatch.delenv("ANSIBLE_COLLECTIONS_PATH")
    assert runner.collection_base() == bundled
    monkeypatch.setattr(runner, "BUNDLED", tmp_path / "none")
    with pytest.raises(errors.LabctlError) as e:
        runner.collection_base()
    assert "ANSIBLE_COLLECTIONS_PATH" in e.value.message and "ansible-galaxy" in e.value.hint


def test_wheel_requirements_leave_out_extras(tmp_path):
    import zipfile

    from labctl import init_cmd

    whl = tmp_path / "x-1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("x-1.dist-info/METADATA", "Metadata-Version: 2.4\nName: x\nVersion: 1\nRequires-Dist: flask<4,>=3.0\n"
                   "Requires-Dist: ansible-core<2.20,>=2.18\nProvides-Extra: test\nRequires-Dist: pytest<9; extra == \"test\"\n"
                   "Requires-Dist: tomli; python_version < \"3.11\"\n\nREADME\n")
    assert init_cmd.requirements(whl) == ["flask<4,>=3.0", "ansible-core<2.20,>=2.18", 'tomli; python_version < "3.11"']


def test_labd_ca_fingerprint_is_the_sha256_of_the_der_certificate():
    import hashlib
    import ssl
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from labctl import login

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "labd test CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    text = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert ssl.PEM_cert_to_DER_cert(text) == cert.public_bytes(serialization.Encoding.DER)
    der = cert.public_bytes(serialization.Encoding.DER)
    fp = login.fingerprint(text)
    assert fp == "sha256:" + hashlib.sha256(der).hexdigest()
    colons = ":".join(fp[7:][i:i + 2] for i in range(0, 64, 2)).upper()
    assert login.parse_fingerprint(colons) == fp and login.parse_fingerprint("SHA256:" + fp[7:].upper()) == fp
    for bad in ("sha256:abc", "md5:" + fp[7:], fp + "00", "sha256:" + "g" * 64):
        with pytest.raises(errors.UsageError):
            login.parse_fingerprint(bad)
    with pytest.raises(errors.Unreachable):
        login.fingerprint("<html>not a certificate</html>")


def test_labd_context_is_named_after_the_host(tmp_path, monkeypatch):
    from labctl import login

    assert login.context_name("https://labd.lab:8443") == "labd.lab"
    assert login.context_name("https://[fd00::1]:8443") == "fd00--1"
    assert login.context_name("https://10.0.0.5") == "10.0.0.5"
    monkeypatch.setenv("LABCTL_CONFIG", str(tmp_path / "c" / "config.yaml"))
    assert config.ca_path("labd.lab") == tmp_path / "c" / "ca" / "labd.lab.pem"
    with pytest.raises(errors.UsageError):
        config.ca_path("../x")


def test_labd_selectors_become_query_parameters_or_local_filters():
    from labctl import fleet
    from labctl.get import parse_selector

    servers = fleet.resource("server")
    params, local = fleet.query(servers, parse_selector(("role=worker,rack=r1,env=prod", "zone!=a"), any_key=True),
                                {"cloud": "lab1", "environment": None})
    assert params == {"cloud": "lab1", "role": "worker", "environment": "prod", "label": ["rack=r1"]}
    assert local == [("zone", "a")]
    assert fleet._value(servers, {"labels": {"zone": "a"}}, "zone") == "a"
    audit = fleet.resource("audit")
    assert fleet.query(audit, parse_selector(("actor=admin",), any_key=True), {})[0] == {"actor": "admin"}
    with pytest.raises(errors.UsageError) as e:
        fleet.query(fleet.resource("users"), parse_selector(("rack=r1",), any_key=True), {})
    assert "users cannot be selected by 'rack'" in e.value.message
    with pytest.raises(errors.UsageError):  # machines keep their own keys
        parse_selector(("rack=r1",))
