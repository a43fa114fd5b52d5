"""End to end: real QEMU machines (TCG) PXE-boot from the bastion running in the lab's network
namespace, through its generated dnsmasq (full DHCP), iPXE and /dispatch.

BIOS = SeaBIOS + the iPXE ROM of Debian's ipxe-qemu (iPXE asks /dispatch directly).
UEFI = q35 + OVMF: firmware PXE -> TFTP snponly.efi -> iPXE -> /dispatch (about 25 s under TCG),
so UEFI runs only where the scenario is about the firmware (discovery, local boot).

What cannot run here: a real Fedora/Ubuntu installer (no install media). The install scenario
stops at the line where the installer would start: the machine fetched its install script and
requested the installer kernel and initrd (stand-ins) with its install token.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from bastion_app.store import Store
from tests.e2e.lab import (
    BASTION_IP,
    BASTION_PORT,
    SYSLOG_PORT,
    Lab,
    Machine,
    esp_marker_disk,
    mbr_marker_disk,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIOS_DISPATCH_TIMEOUT = 90
UEFI_DISPATCH_TIMEOUT = 240


def q(mac: str) -> str:
    """A MAC as it appears in the access log's request line (iPXE URL-encodes the colons)."""
    return mac.replace(":", "%3A")


def install_token(lab: Lab, mac: str) -> str:
    row = Store(lab.data / "state.db").get(mac)
    assert row and row["install_token"], f"{mac} has no install token (state {row and row['state']})"
    return row["install_token"]


def discover_by_api(lab: Lab, mac: str) -> None:
    r = requests.post(lab.api_url + "/api/discover", json={"mac": mac, "hardware": {"firmware": "unknown"}}, timeout=10)
    assert r.status_code in (200, 201), r.text


def queue_install(lab: Lab, mac: str, hostname: str) -> None:
    discover_by_api(lab, mac)
    r = lab.api("POST", "/api/install", json={"mac": mac, "hostname": hostname, "role": "worker", "os": "fedora-43"})
    assert r.status_code == 202, r.text


def progress(lab: Lab, mac: str, token: str, stage: str, percent: int | None, message: str,
             source: str | None = None) -> None:
    """A progress post as the installer sends it. The bastion takes it only from the address its
    install is bound to: a machine with a DHCP lease speaks from ``source`` (its leased address,
    borrowed with _machine_address, inside the namespace); one that never booted was bound to
    the forwarder's address by make_installed's /dispatch, and speaks through the forwarder."""
    body = {"mac": mac, "token": token, "stage": stage, "percent": percent, "message": message}
    if source is None:
        r = requests.post(lab.api_url + "/api/progress", timeout=10, json=body)
        assert r.status_code == 200, r.text
        return
    code = ("import http.client,sys; c=http.client.HTTPConnection(sys.argv[2], int(sys.argv[3]), timeout=10, "
            "source_address=(sys.argv[1], 0)); c.request('POST', '/api/progress', body=sys.argv[4], "
            "headers={'Content-Type': 'application/json'}); r=c.getresponse(); print(r.status, r.read().decode())")
    proc = lab.ns_exec(sys.executable, "-c", code, source, BASTION_IP, str(BASTION_PORT), json.dumps(body))
    assert proc.returncode == 0 and proc.stdout.startswith("200 "), proc.stdout + proc.stderr


def make_installed(lab: Lab, mac: str, hostname: str) -> None:
    """Bring a machine to `installed` the way a real install does: queued, its PXE boot fetches
    the install script (here fetched by the test on its behalf), the installer reports complete."""
    queue_install(lab, mac, hostname)
    script = requests.get(lab.api_url + "/dispatch", params={"mac": mac}, timeout=10).text
    assert "installing fedora-43" in script, script
    progress(lab, mac, install_token(lab, mac), "complete", 100, "installed (simulated)")
    assert lab.machine_state(mac)["state"] == "installed"


def boot_events(lab: Lab, mac: str) -> list[dict]:
    return lab.machine_state(mac)["events"]


# --------------------------------------------------------------------------------------------------
# discovery


@pytest.mark.parametrize("firmware,cpus,memory_mb,disk_gib", [("bios", 2, 640, 3), ("uefi", 1, 768, 2)])
def test_unknown_machine_is_discovered(lab, machines, firmware, cpus, memory_mb, disk_gib):
    mark = lab.access_mark()
    m = machines("disc", firmware=firmware, cpus=cpus, memory_mb=memory_mb, disk_bytes=disk_gib << 30)
    timeout = UEFI_DISPATCH_TIMEOUT + 180 if firmware == "uefi" else BIOS_DISPATCH_TIMEOUT + 180
    lab.wait_access(f"/dispatch?mac={q(m.mac)}", timeout, m)
    dispatched = time.monotonic() - m.started
    lab.wait_access("/images/discovery/initrd.img", 60, m, since=mark)
    got = lab.wait_state(m.mac, "discovered", timeout, m)
    discovered = time.monotonic() - m.started
    hw = got["hardware"]
    assert hw["cpu"]["threads"] == cpus, hw["cpu"]
    assert memory_mb - 128 <= hw["memory_mb"] <= memory_mb, hw["memory_mb"]
    disks = {d["serial"]: d for d in hw["disks"]}
    assert disks[f"LAB-{m.name[:12]}"]["size_bytes"] == disk_gib << 30, hw["disks"]
    assert m.mac in {n["mac"] for n in hw["nics"]}, hw["nics"]
    assert hw["firmware"] == firmware
    # the discovery environment powers the machine off when the bastion accepted its inventory
    deadline = time.monotonic() + 60
    while m.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not m.running(), "the machine did not power off after discovery"
    print(f"\n[e2e] discovery {firmware}: /dispatch after {dispatched:.1f} s, discovered after {discovered:.1f} s")


# --------------------------------------------------------------------------------------------------
# install


def test_queued_machine_fetches_its_install_script_and_tokenised_artefacts(lab, machines):
    m_mac = "52:54:00:e2:e0:01"
    queue_install(lab, m_mac, "e2e-install")
    m = machines("inst", mac=m_mac)
    lab.wait_access(f"/dispatch?mac={q(m.mac)}", BIOS_DISPATCH_TIMEOUT, m)
    m.wait_console("installing fedora-43 as e2e-install", 30)
    token = install_token(lab, m.mac)
    for name in ("vmlinuz", "initrd.img"):
        line = lab.wait_access(f"/images/fedora-43/{name}?token={token}", 60, m)
        assert '" 200 ' in line, line
    state = lab.machine_state(m.mac)
    assert state["state"] == "installing" and state["stage"] == "pxe"
    # the requests came from the machine itself (the address it got from dnsmasq)
    for line in lab.access_lines(f"token={token}"):
        assert line.split()[0] == state["ip"], line


def test_logs_follow_shows_progress_and_syslog_of_a_simulated_install(lab, machines):
    mac = "52:54:00:e2:e0:02"
    queue_install(lab, mac, "e2e-logs")
    m = machines("logs", mac=mac)
    lab.wait_access(f"/images/fedora-43/initrd.img?token={install_token(lab, mac)}", BIOS_DISPATCH_TIMEOUT, m)
    token = install_token(lab, mac)
    ip = lab.machine_state(mac)["ip"]
    assert ip and ip.startswith("10.77.0."), ip
    lab.stop_machine(m)  # the simulated installer speaks for it from here, from its address
    follow = subprocess.Popen([sys.executable, "-m", "labctl.main", "provision", "logs", "-f", mac],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **lab.labctl_env()})
    try:
        time.sleep(2)
        with _machine_address(lab, ip):
            progress(lab, mac, token, "partitioning", 10, "creating partitions on /dev/vda", source=ip)
            _syslog_from(lab, ip, "anaconda: e2e syslog line one")
            progress(lab, mac, token, "packages", 60, "installing packages", source=ip)
            _syslog_from(lab, ip, "anaconda: e2e syslog line two")
            progress(lab, mac, token, "complete", 100, "install finished", source=ip)
        out, _ = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    for text in ("creating partitions on /dev/vda", "installing packages", "e2e syslog line one",
                 "e2e syslog line two", "install finished"):
        assert text in out, out
    assert follow.returncode == 0, out


@contextlib.contextmanager
def _machine_address(lab: Lab, ip: str):
    """Borrow a stopped machine's address: added to the bridge for the moment (it is free)."""
    lab.ns_exec("ip", "addr", "replace", f"{ip}/32", "dev", "br0")
    try:
        yield
    finally:
        lab.ns_exec("ip", "addr", "del", f"{ip}/32", "dev", "br0")


def _syslog_from(lab: Lab, ip: str, message: str) -> None:
    """Send one RFC 3164 syslog line to the bastion from ``ip`` (inside _machine_address)."""
    code = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0)); "
            "s.sendto(sys.argv[2].encode(), (sys.argv[3], int(sys.argv[4])))")
    line = f"<14>Nov 26 12:00:00 e2e-logs {message}"
    proc = lab.ns_exec(sys.executable, "-c", code, ip, line, BASTION_IP, str(SYSLOG_PORT))
    assert proc.returncode == 0, proc.stderr
    time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# installed machines boot from their own disk


def _local_boot_twice(lab: Lab, m: Machine, marker: str, timeout: float, mark: int) -> list[float]:
    """Two boots of an installed machine: each asks /dispatch and is sent to its own disk."""
    seen = []
    offset = 0
    for boot in (1, 2):
        if boot == 2:
            m.started = time.monotonic()
            offset = m.reset()
        m.wait_console(marker, timeout, since=offset)
        seen.append(time.monotonic() - m.started)
        state = lab.machine_state(m.mac)
        assert state["state"] == "installed", state
    dispatches = lab.access_lines(f"/dispatch?mac={q(m.mac)}", since=mark)
    assert len(dispatches) == 2, dispatches
    assert not lab.access_lines("/images/fedora-43/", since=mark), "an installed machine fetched an installer"
    assert installs_started(lab, m.mac) == 1  # only the original install: no reinstall loop
    return seen


def installs_started(lab: Lab, mac: str) -> int:
    return sum(1 for e in boot_events(lab, mac) if e["to_state"] == "installing" and e["from_state"] != "installing")


def test_installed_bios_machine_boots_its_local_disk(lab, machines, tmp_path):
    mac = "52:54:00:e2:e0:03"
    make_installed(lab, mac, "e2e-local-bios")
    marker = "LAB-E2E-MBR-BOOTED"
    disk = tmp_path / "mbr.raw"
    mbr_marker_disk(disk, marker)
    mark = lab.access_mark()
    m = machines("lbios", mac=mac, disk=disk)
    times = _local_boot_twice(lab, m, marker, BIOS_DISPATCH_TIMEOUT, mark)
    assert "booting e2e-local-bios from its local disk" in m.console_text()
    print(f"\n[e2e] local boot BIOS: marker after {times[0]:.1f} s, after reset {times[1]:.1f} s")


def test_installed_uefi_machine_boots_its_local_disk(lab, machines, tmp_path):
    mac = "52:54:00:e2:e0:04"
    make_installed(lab, mac, "e2e-local-uefi")
    marker = "LAB-E2E-ESP-BOOTED"
    disk = tmp_path / "esp.raw"
    esp_marker_disk(disk, marker, tmp_path / "esp")
    mark = lab.access_mark()
    m = machines("luefi", mac=mac, firmware="uefi", disk=disk)
    times = _local_boot_twice(lab, m, marker, UEFI_DISPATCH_TIMEOUT, mark)
    console = m.console_text()
    assert "lab-platform: chainloading" in console, console[-2000:]  # our local-boot GRUB found it
    assert len(lab.access_lines("/images/local-boot/grubx64.efi", since=mark)) == 2
    print(f"\n[e2e] local boot UEFI: marker after {times[0]:.1f} s, after reset {times[1]:.1f} s")


# --------------------------------------------------------------------------------------------------
# debug


def test_debug_request_gives_exactly_one_rescue_boot(lab, machines, tmp_path):
    mac = "52:54:00:e2:e0:05"
    make_installed(lab, mac, "e2e-debug")
    r = lab.api("POST", "/api/debug", json={"mac": mac, "mode": "rescue"})
    assert r.status_code in (200, 202), r.text
    assert lab.machine_state(mac)["debug"] == "rescue"
    marker = "LAB-E2E-DEBUG-DISK"
    disk = tmp_path / "mbr.raw"
    mbr_marker_disk(disk, marker)
    mark = lab.access_mark()
    m = machines("debug", mac=mac, disk=disk)
    m.wait_console("lab-platform: rescue boot", BIOS_DISPATCH_TIMEOUT)
    lab.wait_access("/images/fedora-43/initrd.img", 60, m, since=mark)  # the rescue environment was fetched
    after = lab.machine_state(mac)
    assert after["state"] == "installed" and after["debug"] is None, after
    # the next boot is back to normal: local disk
    offset = m.reset()
    m.wait_console(marker, BIOS_DISPATCH_TIMEOUT, since=offset)
    assert m.console_text()[offset:].count("lab-platform: rescue boot") == 0
    assert lab.machine_state(mac)["state"] == "installed"
    served = [e for e in boot_events(lab, mac) if e["kind"] == "debug_served"]
    assert len(served) == 1, served
    assert installs_started(lab, mac) == 1


# --------------------------------------------------------------------------------------------------
# no PXE ROM: the makeiso ISO


def test_machine_without_pxe_rom_boots_the_makeiso_iso(lab, machines, tmp_path):
    iso = tmp_path / "lab.iso"
    proc = subprocess.run([sys.executable, "-m", "labctl.main", "provision", "makeiso", "--bastion", lab.machine_url,
                           "-O", str(iso)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **lab.labctl_env()})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mark = lab.access_mark()
    m = machines("iso", pxe=False, iso=iso)
    lab.wait_access(f"/dispatch?mac={q(m.mac)}", BIOS_DISPATCH_TIMEOUT + 60, m)
    # and it gets discovery, like any unknown machine
    lab.wait_access("/images/discovery/vmlinuz", 60, m, since=mark)
