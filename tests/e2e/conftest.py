"""Fixtures of the end-to-end suite: one virtual lab (network namespace, bastion + dnsmasq, real
discovery image) shared by every scenario, QEMU machines per test, and a per-scenario timer whose
figures are printed at the end of the run (and appended to $LAB_E2E_REPORT when set)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.e2e import lab as labmod
from tests.support import need, need_binary, need_root

TIMES: list[tuple[str, float, str]] = []


def prerequisites() -> None:
    need_root()
    need_binary("ip", "qemu-system-x86_64", "dnsmasq", "grub-mkstandalone", "mformat", "apt-get", "dpkg-deb")
    need(Path("/dev/net/tun").exists(), "needs /dev/net/tun (QEMU tap devices)")
    for f in (labmod.OVMF_CODE, labmod.OVMF_VARS):
        need(f.exists(), f"needs {f} (Debian package ovmf)")
    need(Path("/usr/lib/ipxe/snponly.efi").exists(), "needs /usr/lib/ipxe/snponly.efi (Debian package ipxe)")
    need(Path("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(), "needs QEMU's iPXE ROMs (Debian package ipxe-qemu)")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The shared virtual lab (full DHCP: the namespace has no other DHCP server)."""
    prerequisites()
    root = tmp_path_factory.mktemp("lab")
    info = labmod.prepare_images(root / "data")
    TIMES.append(("images (discovery build or cache, local-boot GRUB)", info["seconds"],
                  f"discovery image {info['discovery_bytes'] / 1e6:.1f} MB{' (cached)' if info['cached'] else ''}"))
    the_lab = labmod.Lab(root)
    try:
        started = time.monotonic()
        the_lab.up()
        TIMES.append(("lab up (netns, bastion, dnsmasq)", time.monotonic() - started, the_lab.ns))
        yield the_lab
    finally:
        the_lab.down()


class Machines:
    """Creates machines in a lab and stops them when the test ends (pass or fail)."""

    def __init__(self, lab: labmod.Lab, prefix: str):
        self.lab = lab
        self.prefix = prefix
        self.made: list[labmod.Machine] = []

    def __call__(self, name: str, **kw) -> labmod.Machine:
        m = self.lab.machine(f"{self.prefix}-{name}", **kw)
        self.made.append(m)
        return m

    def stop_all(self) -> None:
        for m in self.made:
            self.lab.stop_machine(m)


@pytest.fixture
def machines(lab, request):
    made = Machines(lab, request.node.name.replace("[", "-").replace("]", "")[-24:].strip("-_"))
    yield made
    made.stop_all()


@pytest.fixture(autouse=True)
def _scenario_timer(request):
    started = time.monotonic()
    yield
    rep = getattr(request.node, "rep_call", None)
    outcome = ("xfail" if hasattr(rep, "wasxfail") else rep.outcome) if rep else "error"
    TIMES.append((request.node.name, time.monotonic() - started, outcome))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


def pytest_terminal_summary(terminalreporter):
    if not TIMES:
        return
    tr = terminalreporter
    tr.write_sep("=", "e2e scenario times")
    lines = [f"{secs:7.1f} s  {name}  [{note}]" for name, secs, note in TIMES]
    for line in lines:
        tr.write_line(line)
    report = os.environ.get("LAB_E2E_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write("\n".join(lines) + "\n")
