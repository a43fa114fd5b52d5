"""The image deploy's install script (templates/image/install.sh.j2), its route, its iPXE entry and
the small-disk layout rule: rendered for every role, parsed by bash, the disk step run for real
against a fake machine, the bash rule held to labcore.layout's."""

from __future__ import annotations

import subprocess

import pytest

from bastion_app.installers import UnsafeValue, image_install_script
from bastion_app.render import render
from labcore import domain, layout
from tests.support import IMAGE, KEY, FakeMachine, need_binary, queue_install
from tests.support import IMAGE_SHA as SHA
from tests.support import INSTALL_BASE as BASE
from tests.support import image_machine as machine

BASE_TEST = "http://localhost"  # the Flask test client's base URL


@pytest.mark.parametrize("role", domain.ROLE_NAMES)
def test_script_renders_for_every_role_and_bash_parses_it(role, tmp_path):
    need_binary("bash")
    text = image_install_script(machine(role), base=BASE, image=IMAGE)
    path = tmp_path / "install.sh"
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"LAB_IMAGE_SHA256={SHA}" in text and "LAB_IMAGE_BYTES=255000000" in text
    assert f"LAB_IMAGE_URL={BASE}/images/debian-12/rootfs.tar.zst" in text
    assert f"LAB_DISK_NEED_MIB={layout.min_disk_mib(role)}" in text
    assert ("90-lab-k3s.conf" in text) == (role in domain.K3S_ROLES)
    for volume in layout.volumes_for(role):
        assert f"[{volume.name}]={volume.min_mib}" in text


def test_no_image_means_a_script_that_fails_before_writing():
    text = image_install_script(machine(), base=BASE, image=None)
    assert "LAB_IMAGE_SHA256=''" in text
    # the image step (which stops without an image) comes before anything that writes
    assert text.index("the bastion has no image for debian-12") < text.index("wipefs")
    assert text.index("image checksum mismatch") < text.index("sfdisk")


def test_an_invalid_checksum_in_the_manifest_is_refused():
    from bastion_app.images.sync import ImageError

    with pytest.raises(ImageError):
        image_install_script(machine(), base=BASE, image={"sha256": "x; reboot", "size_bytes": 1})


@pytest.mark.parametrize("field,value", [("hostname", "a\nb"), ("mac", "52:54:00:00:00:0g")])
def test_hostile_machine_values_are_refused(field, value):
    m = machine()
    m[field] = value
    with pytest.raises((UnsafeValue, ValueError)):
        image_install_script(m, base=BASE, image=IMAGE)


def test_kernel_args_reach_grub_of_the_installed_system():
    text = image_install_script(machine(), base=BASE, image=IMAGE, kernel_args="console=ttyS1,115200 nomodeset")
    assert "LAB_KERNEL_ARGS='console=ttyS1,115200 nomodeset'" in text
    assert '"GRUB_CMDLINE_LINUX=\\"$LAB_KERNEL_ARGS\\""' in text and "GRUB_TIMEOUT_STYLE=hidden" in text
    with pytest.raises(UnsafeValue):
        image_install_script(machine(), base=BASE, image=IMAGE, kernel_args='x" ; reboot')


def test_keys_are_single_quoted_words():
    text = image_install_script(machine(), base=BASE, image=IMAGE)
    assert f"printf '%s\\n' '{KEY}' >>" in text


@pytest.mark.parametrize("role", domain.ROLE_NAMES)
@pytest.mark.parametrize("vg_gib", [9, 12, 17, 40, 120, 400])
def test_bash_layout_rule_matches_labcore(role, vg_gib, tmp_path):
    """lab_scaled_sizes (bash) gives what labcore.layout.scaled_sizes (Python) gives."""
    need_binary("bash")
    text = image_install_script(machine(role), base=BASE, image=IMAGE)
    start = text.index("LAB_LVS=(")
    lvs = text[start: text.index(")\n", start) + 2]
    rule = render("image/_layout-rule.sh.j2", volumes=layout.volumes_for(role))
    vg = vg_gib * 1024
    out = subprocess.run(["bash", "-c", lvs + rule + f"\nlab_scaled_sizes {vg}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = {name: (None if size == "grow" else int(size)) for name, size in (line.split() for line in out.stdout.splitlines())}
    assert got == layout.scaled_sizes(role, vg)


@pytest.mark.parametrize("role", domain.ROLE_NAMES)
def test_small_disk_rule_fits_and_keeps_minimums(role):
    for vg in (layout.min_disk_mib(role) - 3440, 17036, 60_000, 150_000):
        sizes = layout.scaled_sizes(role, vg)
        fixed = [s for s in sizes.values() if s is not None]
        assert sum(fixed) <= vg
        for v in layout.volumes_for(role):
            if sizes[v.name] is not None:
                assert sizes[v.name] >= v.min_mib and sizes[v.name] % layout.EXTENT_MIB == 0
                assert sizes[v.name] <= v.size_mib
    # a disk of the seed's size gets the seed's sizes
    seed = {v.name: v.size_mib for v in layout.volumes_for(role)}
    assert layout.scaled_sizes(role, layout.disk_mib_needed(role)) == seed
    # the documented example: a 20 GiB disk installs
    assert layout.min_disk_mib(role) < 20 * 1024


def _disk_step(fm: FakeMachine, role: str) -> subprocess.CompletedProcess:
    text = image_install_script(machine(role), base=BASE, image=IMAGE)
    # only the disk step: everything up to the image download
    head = text[: text.index("# -- image:")]
    return fm.run(head + '\necho "MODE=$LAB_MODE DISK=$LAB_DISK FW=$LAB_FIRMWARE"\n')


def test_disk_step_picks_nvme_and_fails_small_disks_before_writing(tmp_path):
    fm = FakeMachine(tmp_path / "big")
    fm.disk("sda", size=100 * 2**30 // 512)
    fm.disk("nvme0n1", tran="nvme", size=20 * 2**30 // 512)
    proc = _disk_step(fm, "worker")
    assert proc.returncode == 0, proc.stderr
    assert "MODE=fresh DISK=/dev/nvme0n1 FW=uefi" in proc.stdout
    small = FakeMachine(tmp_path / "small", uefi=False)
    small.disk("vda", tran="", size=11 * 2**30 // 512)
    proc = _disk_step(small, "worker")
    assert proc.returncode == 1
    failed = [p for p in small.progress() if p["stage"] == "failed"]
    assert failed and "too small for role worker" in failed[0]["message"] and "step disk" in failed[0]["message"]
    assert _disk_step(small, "vanilla").returncode == 0  # 11 GiB holds vanilla's minimum


def test_install_route_serves_the_script_only_to_image_installs(client, auth):
    mac = "52:54:00:ab:cd:01"
    token = queue_install(client, auth, os_name="debian-12", mac=mac)
    script = client.get(f"/dispatch?mac={mac}").get_data(as_text=True)  # a second boot of the installer
    assert "/images/installer/vmlinuz" in script and f"lab.script={BASE_TEST}/install.sh?mac={mac}&token={token}" in script
    r = client.get(f"/install.sh?mac={mac}&token={token}")
    assert r.status_code == 200 and r.mimetype == "text/x-shellscript"
    text = r.get_data(as_text=True)
    assert text.startswith("#!/bin/bash") and "LAB_IMAGE_SHA256=''" in text  # no image built here
    assert client.get(f"/install.sh?mac={mac}&token={'x' * len(token)}").status_code == 403
    assert client.get(f"/ks?mac={mac}&token={token}").status_code == 409  # not a kickstart install
    fedora = "52:54:00:ab:cd:02"
    ftoken = queue_install(client, auth, mac=fedora, hostname="node-fedora")
    assert client.get(f"/install.sh?mac={fedora}&token={ftoken}").status_code == 409
