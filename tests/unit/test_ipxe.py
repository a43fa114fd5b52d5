"""iPXE scripts: exact output for each boot mode, and no input can add a line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion_app.render import UnsafeValue, render
from labcore import validate as v

GOLDEN = Path(__file__).parent / "golden"
BASE = "http://10.0.0.1:8080"
MAC = "52:54:00:12:34:56"
TOKEN = "tok_ABCDEFGHIJKLMNOPQRSTUV"

CASES = {
    "discover-image": ("ipxe/discover.ipxe.j2", dict(base=BASE, mac=MAC, method="image", action="poweroff", installer_os="fedora-43", kernel_args="")),
    "discover-kickstart": ("ipxe/discover.ipxe.j2", dict(base=BASE, mac=MAC, method="kickstart", action="poweroff", installer_os="fedora-43", kernel_args="")),
    "discover-none": ("ipxe/discover.ipxe.j2", dict(base=BASE, mac=MAC, method="none", action="poweroff", installer_os="fedora-43", kernel_args="")),
    "install-fedora": ("ipxe/install.ipxe.j2", dict(base=BASE, mac=MAC, token=TOKEN, os="fedora-43", role="worker", hostname="node1", installer="kickstart", syslog="10.0.0.1:5514", kernel_args="")),
    "install-ubuntu": ("ipxe/install.ipxe.j2", dict(base=BASE, mac=MAC, token=TOKEN, os="ubuntu-26.04", role="infra", hostname="node2", installer="autoinstall", syslog="10.0.0.1:5514", kernel_args="")),
    "install-debian": ("ipxe/install.ipxe.j2", dict(base=BASE, mac=MAC, token=TOKEN, os="debian-12", role="worker", hostname="node3", installer="image", syslog="10.0.0.1:5514", kernel_args="console=ttyS1,115200 nomodeset")),
    "debug": ("ipxe/debug.ipxe.j2", dict(base=BASE, mac=MAC, installer_os="fedora-43")),
    "pxe-debug": ("ipxe/pxe-debug.ipxe.j2", dict(base=BASE, mac=MAC)),
    "local-boot": ("ipxe/local-boot.ipxe.j2", dict(base=BASE, mac=MAC, hostname="node1", efi_chain="")),
    "local-boot-grub": ("ipxe/local-boot.ipxe.j2", dict(base=BASE, mac=MAC, hostname="node1", efi_chain=BASE + "/images/local-boot/grubx64.efi")),
    "wait": ("ipxe/wait.ipxe.j2", dict(base=BASE, mac=MAC)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_output(name):
    template, ctx = CASES[name]
    out = render(template, **ctx)
    golden = GOLDEN / f"{name}.ipxe"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text(), f"{name} differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    assert out.startswith("#!ipxe\n")


def test_local_boot_has_bios_and_uefi_paths():
    out = render(*CASES["local-boot-grub"][:1], **CASES["local-boot-grub"][1])
    assert "sanboot --no-describe --drive 0x80" in out
    efi = [ln for ln in out.split(":efi", 1)[1].splitlines() if ln and not ln.startswith("#")]
    assert efi[0].startswith("chain --autofree") and efi[-1] == "exit 1"


@pytest.mark.parametrize("bad", ["a b", "a\nb", "x;y", "$(id)", "a'b", "${x}", "a||b"])
def test_unsafe_values_are_refused(bad):
    for key in ("hostname", "token", "base"):
        ctx = {**CASES["install-fedora"][1], key: bad}
        with pytest.raises(UnsafeValue):
            render("ipxe/install.ipxe.j2", **ctx)


def _ok(fn, s):
    try:
        return fn(s)
    except v.ValidationError:
        return None


@settings(max_examples=300, deadline=None)
@given(hostname=st.text(max_size=40), mac=st.text(max_size=20), token=st.text(max_size=40))
def test_no_input_adds_a_line(hostname, mac, token):
    """Whatever a user or machine sends, either validation rejects it, or the rendered script has
    exactly the lines of the reference rendering."""
    hostname = _ok(v.hostname, hostname) or "node1"
    mac = _ok(v.mac, mac) or MAC
    token = _ok(v.token, token) or TOKEN
    for name, (template, ctx) in CASES.items():
        ref = render(template, **ctx)
        out = render(template, **{**ctx, **{k: val for k, val in (("hostname", hostname), ("mac", mac), ("token", token)) if k in ctx}})
        assert out.count("\n") == ref.count("\n"), name
        assert [ln.split(" ", 1)[0] for ln in out.splitlines()] == [ln.split(" ", 1)[0] for ln in ref.splitlines()]


def test_syslog_target_for_inst_syslog():
    from bastion_app.installers import syslog_target

    assert syslog_target("http://10.0.0.1:8080", 5514) == "10.0.0.1:5514"
    assert syslog_target("http://[fd00::1]:8080", 5514) == "[fd00::1]:5514"
    ctx = {**CASES["install-fedora"][1], "syslog": syslog_target("http://[fd00::1]:8080", 5514)}
    assert " inst.syslog=[fd00::1]:5514 " in render("ipxe/install.ipxe.j2", **ctx)


def test_kernel_args_reach_the_kernel_lines_and_are_validated():
    from labcore import bastion_config

    ctx = {**CASES["install-fedora"][1], "kernel_args": "console=ttyS1,115200 nomodeset"}
    kernel = next(ln for ln in render("ipxe/install.ipxe.j2", **ctx).splitlines() if ln.startswith("kernel "))
    assert kernel.endswith(" console=ttyS1,115200 nomodeset")
    assert render(*CASES["discover-image"][:1], **{**CASES["discover-image"][1], "kernel_args": "console=ttyS1"}).count(" console=ttyS1\n") == 1
    for bad in ("x;reboot", "$(id)", "a\\b", "a" * 300):
        with pytest.raises(bastion_config.ConfigError):
            bastion_config.load(Path("/nonexistent"), overrides={"kernel_args": bad}, env={}, detect=False)
    assert bastion_config.load(Path("/nonexistent"), overrides={"kernel_args": " console=ttyS1 \n quiet "}, env={},
                               detect=False).kernel_args == "console=ttyS1 quiet"
