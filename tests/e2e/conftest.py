"""Fixtures of the end-to-end suite: one virtual lab (network namespace, bastion + dnsmasq, real
discovery image) shared by every scenario, QEMU machines per test, and a per-scenario timer whose
figures are printed at the end of the run (and appended to $LAB_E2E_REPORT when set)."""

from __future__ import annotations

import os
import time

import pytest

from tests.e2e import lab as labmod
from tests.support import E2E_TIMES, LabMachines, e2e_lab, e2e_prerequisites


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The shared virtual lab (full DHCP: the namespace has no other DHCP server)."""
    e2e_prerequisites()
    root = tmp_path_factory.mktemp("lab")
    info = labmod.prepare_images(root / "data")
    E2E_TIMES.append(("images (discovery, local-boot GRUB, debian-12 and its installer: built or cached)",
                      info["seconds"], f"discovery image {info['discovery_bytes'] / 1e6:.1f} MB, debian-12 image "
                      f"{info['os_image_bytes'] / 1e6:.1f} MB, installer {info['installer_bytes'] / 1e6:.1f} MB"
                      f"{' (cached)' if info['cached'] else ''}"))
    with e2e_lab(root, "lab up (netns, bastion, dnsmasq)") as the_lab:
        yield the_lab


@pytest.fixture
def machines(lab, request):
    made = LabMachines(lab, request.node.name.replace("[", "-").replace("]", "")[-24:].strip("-_"))
    yield made
    made.stop_all()


@pytest.fixture(autouse=True)
def _scenario_timer(request):
    started = time.monotonic()
    yield
    rep = getattr(request.node, "rep_call", None)
    outcome = ("xfail" if hasattr(rep, "wasxfail") else rep.outcome) if rep else "error"
    E2E_TIMES.append((request.node.name, time.monotonic() - started, outcome))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


def pytest_terminal_summary(terminalreporter):
    if not E2E_TIMES:
        return
    tr = terminalreporter
    tr.write_sep("=", "e2e scenario times")
    lines = [f"{secs:7.1f} s  {name}  [{note}]" for name, secs, note in E2E_TIMES]
    for line in lines:
        tr.write_line(line)
    report = os.environ.get("LAB_E2E_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write("\n".join(lines) + "\n")
