"""`labctl doctor`'s DHCP probe: a real DHCPDISCOVER inside network namespaces created here, answered
by a real dnsmasq (--no-ping: it answers at once instead of ping-checking the address for ~3 s). Nothing is sent on any interface of the host: the probe runs in its own
namespace, on one end of a veth pair whose other end is in the dnsmasq's namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import need_binary, need_root, stop_process, wait_for

LABCTL = [sys.executable, "-m", "labctl.main"]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def segment(tmp_path):
    """Two namespaces joined by a veth pair: `srv` (10.77.0.1, dnsmasq) and `cli` (10.77.0.2, the probe)."""
    need_root()
    need_binary("ip", "dnsmasq")
    tag = f"{os.getpid() % 100000}"
    srv, cli = f"lcds{tag}", f"lcdc{tag}"
    sh("ip", "netns", "add", srv)
    sh("ip", "netns", "add", cli)
    procs: list[subprocess.Popen] = []
    try:
        sh("ip", "link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vc{tag}")
        sh("ip", "link", "set", f"vs{tag}", "netns", srv)
        sh("ip", "link", "set", f"vc{tag}", "netns", cli)
        for ns, dev, addr in ((srv, f"vs{tag}", "10.77.0.1/24"), (cli, f"vc{tag}", "10.77.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        def dnsmasq(*extra: str) -> None:
            n = len(procs)
            p = subprocess.Popen(["ip", "netns", "exec", srv, "dnsmasq", "--keep-in-foreground", "--user=root", "--log-facility=-", "--conf-file=/dev/null",
                                  "--port=0", "--no-ping", f"--interface=vs{tag}", "--bind-interfaces",
                                  f"--dhcp-leasefile={tmp_path}/leases{n}", f"--pid-file={tmp_path}/pid{n}", "--log-dhcp",
                                  *extra], stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"dnsmasq{n}.log", "wb"))
            procs.append(p)
            wait_for(lambda: (tmp_path / f"pid{n}").exists() or p.poll() is not None, timeout=10, what="dnsmasq start")
            assert p.poll() is None, (tmp_path / f"dnsmasq{n}.log").read_text()

        yield {"cli": cli, "iface": f"vc{tag}", "dnsmasq": dnsmasq, "tmp": tmp_path}
    finally:
        for p in procs:
            stop_process(p, 10)
        subprocess.run(["ip", "netns", "del", srv], capture_output=True)
        subprocess.run(["ip", "netns", "del", cli], capture_output=True)


def doctor(seg, *args: str) -> tuple[int, dict, str]:
    p = subprocess.run(["ip", "netns", "exec", seg["cli"], *LABCTL, "doctor", "--only", "dhcp",
                        "--interface", seg["iface"], "--dhcp-timeout", "3", "-o", "json", *args],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LABCTL_HOME": str(seg["tmp"]), "LABCTL_CONFIG": str(seg["tmp"] / "c.yaml")})
    return p.returncode, json.loads(p.stdout or "{}"), p.stderr


def bastion_dir(seg, mode: str):
    d = seg["tmp"] / "bastion"
    d.mkdir(exist_ok=True)
    (d / "token").write_text("x" * 32 + "\n")
    (d / "bastion.yaml").write_text(
        f"interface: {seg['iface']}\nserver_ip: 10.77.0.2\nsubnet: 10.77.0.0/24\ndhcp_mode: {mode}\n"
        + ("dhcp_range: 10.77.0.200,10.77.0.210\n" if mode == "full" else ""))
    return str(d)


def test_probe_lists_the_dhcp_server_that_answers(segment):
    segment["dnsmasq"]("--dhcp-range=10.77.0.100,10.77.0.150,1h")
    rc, doc, err = doctor(segment)
    assert rc == 0, err
    [check] = doc["checks"]
    assert check["name"] == "dhcp" and check["status"] == "pass"
    assert "10.77.0.1 offers 10.77.0." in check["detail"]
    # this bastion in full-DHCP mode on that segment: the other server is a competitor
    rc, doc, err = doctor(segment, "--data-dir", bastion_dir(segment, "full"))
    assert rc == 8 and doc["checks"][0]["status"] == "fail"
    assert "another DHCP server offers addresses" in doc["checks"][0]["detail"]
    # in proxy mode the LAN's DHCP server is exactly what is needed
    rc, doc, err = doctor(segment, "--data-dir", bastion_dir(segment, "proxy"))
    assert rc == 0 and doc["checks"][0]["status"] == "pass", doc


def test_probe_flags_a_competing_pxe_server(segment):
    segment["dnsmasq"]("--dhcp-range=10.77.0.100,10.77.0.150,1h", "--dhcp-boot=rogue.kpxe")
    rc, doc, err = doctor(segment, "--data-dir", bastion_dir(segment, "proxy"))
    assert rc == 8, (doc, err)
    assert "another PXE server answers" in doc["checks"][0]["detail"] and "rogue.kpxe" in doc["checks"][0]["detail"]


def test_probe_with_nobody_answering(segment):
    rc, doc, err = doctor(segment, "--data-dir", bastion_dir(segment, "proxy"))
    assert rc == 8 and "nobody answered" in doc["checks"][0]["detail"]
    rc, doc, err = doctor(segment)
    assert rc == 0 and "nobody answered" in doc["checks"][0]["detail"]
