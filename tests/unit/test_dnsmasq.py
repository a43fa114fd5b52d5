"""dnsmasq configuration: generated from Config, accepted by the real `dnsmasq --test`, values
validated (nothing can add a line)."""

from __future__ import annotations

import ipaddress
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion_app import dnsmasq
from bastion_app.supervisor import dnsmasq_child
from labcore import bastion_config as configmod
from tests.support import need_binary

IFACE = dnsmasq.Interface("eth0", ipaddress.IPv4Interface("10.20.0.5/24"))


def make_cfg(tmp_path, **over):
    base = {"listen": "0.0.0.0:8080", "server_ip": "10.20.0.5", "subnet": "10.20.0.0/24", "interface": "eth0"}
    return configmod.load(tmp_path / "data", overrides={**base, **over}, env={}, detect=False)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def dnsmasq_test(tmp_path, text: str) -> None:
    need_binary("dnsmasq")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(text)
    res = dnsmasq.check_config(conf, shutil.which("dnsmasq"))
    assert res.returncode == 0, f"dnsmasq --test rejected the config:\n{res.stderr}\n{text}"
    assert "syntax check OK" in (res.stdout + res.stderr)


def test_proxy_mode_is_default_and_passes_dnsmasq_test(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.dhcp_mode == "proxy"
    text = dnsmasq.render_config(cfg, tmp_path / "data" / "tftp", IFACE)
    ls = lines(text)
    assert "port=0" in ls
    assert "interface=eth0" in ls
    assert "bind-interfaces" in ls
    assert "log-facility=-" in ls
    assert "enable-tftp" in ls
    assert f"tftp-root={tmp_path}/data/tftp" in ls
    assert f"pid-file={tmp_path}/data/run/dnsmasq.pid" in ls
    assert f"dhcp-leasefile={tmp_path}/data/run/dnsmasq.leases" in ls
    assert "dhcp-range=10.20.0.0,proxy,255.255.255.0" in ls
    assert "dhcp-match=set:ipxe,175" in ls
    assert "dhcp-userclass=set:ipxe,iPXE" in ls
    assert "dhcp-match=set:efi64,option:client-arch,7" in ls
    assert "dhcp-match=set:efi64,option:client-arch,9" in ls
    assert 'pxe-service=tag:!ipxe,x86PC,"lab-platform iPXE (BIOS)",undionly.kpxe' in ls
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"lab-platform iPXE (UEFI)",snponly.efi' in ls
    # iPXE: the dispatch URL with this server as next-server in the proxy offer, and no pxe-service
    # of its own (a menu would send iPXE into a port-4011 boot-server request)
    assert "dhcp-boot=tag:ipxe,http://10.20.0.5:8080/dispatch?mac=${netX/mac},,10.20.0.5" in ls
    assert [ln for ln in ls if ln.startswith("pxe-service=")] == [
        'pxe-service=tag:!ipxe,x86PC,"lab-platform iPXE (BIOS)",undionly.kpxe',
        'pxe-service=tag:!ipxe,X86-64_EFI,"lab-platform iPXE (UEFI)",snponly.efi',
        'pxe-service=tag:!ipxe,BC_EFI,"lab-platform iPXE (UEFI)",snponly.efi']
    assert not any(ln.startswith("dhcp-range=") and "proxy" not in ln for ln in ls)
    dnsmasq_test(tmp_path, text)


def test_full_mode(tmp_path):
    cfg = make_cfg(tmp_path, dhcp_mode="full", dhcp_range="10.20.0.100,10.20.0.200", gateway="10.20.0.1")
    text = dnsmasq.render_config(cfg, tmp_path / "tftp", IFACE)
    ls = lines(text)
    assert "dhcp-range=10.20.0.100,10.20.0.200,255.255.255.0,12h" in ls
    assert "dhcp-option=option:router,10.20.0.1" in ls
    assert "dhcp-boot=tag:ipxe,http://10.20.0.5:8080/dispatch?mac=${netX/mac}" in ls
    assert "dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi" in ls
    assert "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe" in ls
    assert not any("proxy" in ln or ln.startswith("pxe-service") for ln in ls)
    dnsmasq_test(tmp_path, text)


def test_public_url_is_the_dispatch_base(tmp_path):
    cfg = make_cfg(tmp_path, public_url="http://bastion.lab:8080/pxe")
    text = dnsmasq.render_config(cfg, tmp_path / "tftp", IFACE)
    assert "dhcp-boot=tag:ipxe,http://bastion.lab:8080/pxe/dispatch?mac=${netX/mac},,10.20.0.5\n" in text
    dnsmasq_test(tmp_path, text)


@pytest.mark.parametrize("rng, msg", [
    ("10.20.1.10,10.20.1.20", "outside 10.20.0.0/24"),
    ("10.20.0.200,10.20.0.100", "comes after"),
    ("10.20.0.1,10.20.0.10", "own address"),
    ("10.20.0.10", "START,END"),
])
def test_full_mode_bad_range_is_a_clear_error(tmp_path, rng, msg):
    cfg = make_cfg(tmp_path, dhcp_mode="full", dhcp_range="10.20.0.100,10.20.0.200")
    cfg.dhcp_range = rng  # bypass config validation: the renderer checks again
    with pytest.raises(dnsmasq.DnsmasqError, match=msg):
        dnsmasq.render_config(cfg, tmp_path / "tftp", IFACE)


def test_full_mode_without_range(tmp_path):
    with pytest.raises(configmod.ConfigError, match="--dhcp-range"):
        make_cfg(tmp_path, dhcp_mode="full")  # the configuration model refuses it
    cfg = make_cfg(tmp_path)
    cfg.dhcp_mode = "full"  # bypass config validation: the renderer checks again
    with pytest.raises(dnsmasq.DnsmasqError, match="--dhcp-range"):
        dnsmasq.render_config(cfg, tmp_path / "tftp", IFACE)


def test_overlong_dispatch_url_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, public_url="http://bastion.lab:8080/" + "a" * 120)
    with pytest.raises(dnsmasq.DnsmasqError, match="longer than a DHCP boot file name"):
        dnsmasq.render_config(cfg, tmp_path / "tftp", IFACE)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(bad=st.text(min_size=1, max_size=40).filter(lambda s: any(c in s for c in "\n\r ,#\"'$`;\x00")))
def test_hostile_values_never_reach_the_config(tmp_path_factory, bad):
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = make_cfg(tmp)
    for attr, value in (("interface", bad), ("public_url", "http://x" + bad)):
        c = make_cfg(tmp)
        setattr(c, attr, value)  # as if a caller bypassed config validation
        iface = dnsmasq.Interface(c.interface, IFACE.address)
        with pytest.raises(dnsmasq.DnsmasqError):
            dnsmasq.render_config(c, tmp / "tftp", iface)
    with pytest.raises(dnsmasq.DnsmasqError):
        dnsmasq.render_config(cfg, tmp / ("tftp" + bad), IFACE)
    with pytest.raises(dnsmasq.DnsmasqError):
        dnsmasq.render_config(cfg, tmp / "tftp", IFACE, user="root" + bad)


def test_config_validation_rejects_newline_in_interface(tmp_path):
    with pytest.raises(configmod.ConfigError):
        make_cfg(tmp_path, interface="eth0\nport=53")
    with pytest.raises(configmod.ConfigError):
        make_cfg(tmp_path, dhcp_mode="full", dhcp_range="10.20.0.10,10.20.0.20\nport=53")


def test_tftp_root_filled_from_debian_ipxe(tmp_path):
    need_binary("dnsmasq")
    from tests.support import need

    need(all((dnsmasq.IPXE_DIR / f).is_file() for f in dnsmasq.IPXE_FILES.values()),
         "needs Debian's ipxe package (/usr/lib/ipxe)")
    root = tmp_path / "tftp"
    assert sorted(dnsmasq.fill_tftp_root(root)) == sorted(dnsmasq.IPXE_FILES)
    for name, src in dnsmasq.IPXE_FILES.items():
        assert (root / name).read_bytes() == (dnsmasq.IPXE_DIR / src).read_bytes()
    assert dnsmasq.fill_tftp_root(root) == []  # unchanged files are left alone
    (root / "snponly.efi").write_bytes(b"stale")
    assert dnsmasq.fill_tftp_root(root) == ["snponly.efi"]


def test_missing_ipxe_is_a_clear_error(tmp_path):
    with pytest.raises(dnsmasq.DnsmasqError, match="ipxe package"):
        dnsmasq.fill_tftp_root(tmp_path / "tftp", source=tmp_path / "nothing")


def test_child_spec_writes_config_for_a_real_interface(tmp_path):
    """On loopback (always present, 127.0.0.1/8): the supervisor's spec, the config it wrote, and
    `dnsmasq --test` accepting that file."""
    need_binary("dnsmasq")
    cfg = make_cfg(tmp_path, interface="lo", server_ip="", subnet="")
    spec = dnsmasq_child(cfg)
    conf = tmp_path / "data" / "run" / "dnsmasq.conf"
    assert spec.name == "dnsmasq"
    assert spec.argv[1:] == ["--keep-in-foreground", f"--conf-file={conf}"]
    text = conf.read_text()
    assert "interface=lo\n" in text and "dhcp-range=127.0.0.0,proxy,255.0.0.0\n" in text
    assert (tmp_path / "data" / "tftp" / "undionly.kpxe").is_file()
    dnsmasq_test(tmp_path, text)


def test_unknown_interface_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, interface="nosuchif0")
    with pytest.raises(dnsmasq.DnsmasqError, match="does not exist"):
        dnsmasq_child(cfg)


def test_supervisor_children_include_dnsmasq_unless_disabled(tmp_path):
    from bastion_app.supervisor import children

    need_binary("dnsmasq")
    cfg = make_cfg(tmp_path, interface="lo", server_ip="", subnet="")
    assert "dnsmasq" in [c.name for c in children(cfg)]
    cfg.dnsmasq = False
    assert "dnsmasq" not in [c.name for c in children(cfg)]


def test_write_config_reports_changes(tmp_path):
    need_binary("dnsmasq")
    cfg = make_cfg(tmp_path, interface="lo", server_ip="", subnet="")
    conf = tmp_path / "out.conf"
    assert dnsmasq.write_config(cfg, conf) is True
    assert dnsmasq.write_config(cfg, conf) is False  # same content, same TFTP files
    cfg.dhcp_mode, cfg.dhcp_range = "full", "127.0.0.10,127.0.0.20"
    assert dnsmasq.write_config(cfg, conf) is True and "dhcp-range=127.0.0.10,127.0.0.20" in conf.read_text()
    dnsmasq_test(tmp_path, conf.read_text())
