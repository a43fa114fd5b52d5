"""The kickstart's %pre (disk auto-detection, fresh vs reprovision, the generated partitioning)
and %post's boot-order function, run for real in bash against a fake /sys tree and PATH shims
for lsblk, lvm, curl and efibootmgr (tests.support.FakeMachine). The generated include is then spliced into the kickstart
and parsed by pykickstart (F43), whose handler is checked for the layout."""

from __future__ import annotations

import subprocess

import pytest

from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.installers import kickstart
from tests.support import MAC, NVME_PARTS, TOKEN, FakeMachine, install_params, script, sections, seed_mib


def render(role="worker", disk=""):
    return kickstart(install_params(role, disk), base="http://10.0.0.1:8080", syslog_port=5514, manifest=DEFAULT_MANIFEST)


def run_pre(fm: FakeMachine, role="worker", disk="") -> tuple[subprocess.CompletedProcess, str]:
    text = render(role, disk)
    return fm.run(script(text, "pre")), text


def spliced(text: str, include: str):
    assert "%include /tmp/part-include\n" in text
    return sections(text.replace("%include /tmp/part-include\n", include))


def lv_table(handler) -> dict[str, dict]:
    return {lv.name: {"mount": lv.mountpoint, "size": lv.size, "grow": lv.grow, "format": lv.format,
                      "preexist": lv.preexist, "fstype": lv.fstype} for lv in handler.logvol.lvList}


# -- disk detection --------------------------------------------------------------------------
def test_auto_prefers_nvme_over_sata_and_virtio(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("sda")
    fm.disk("vda", tran="")
    fm.disk("nvme0n1", tran="nvme")
    res, _ = run_pre(fm)
    assert res.returncode == 0, res.stderr
    assert "ignoredisk --only-use=nvme0n1\n" in fm.include
    assert "clearpart --all --initlabel --disklabel=gpt --drives=nvme0n1\n" in fm.include


def test_auto_skips_usb_removable_readonly_and_empty(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("sda", tran="usb")  # a USB stick that says it is not removable
    fm.disk("sdb", removable=1)
    fm.disk("sdc", ro=1)
    fm.disk("sdd", size=0)  # an empty card reader
    fm.disk("nvme0c0n1", tran="nvme")  # hidden multipath controller path
    fm.disk("sde")
    fm.disk("vda", tran="")
    res, _ = run_pre(fm)
    assert res.returncode == 0, res.stderr
    assert "ignoredisk --only-use=sde\n" in fm.include


def test_auto_virtio_when_nothing_else(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("sda", tran="usb")
    fm.disk("vda", tran="")
    res, _ = run_pre(fm)
    assert res.returncode == 0, res.stderr
    assert "ignoredisk --only-use=vda\n" in fm.include


def test_no_usable_disk_reports_failure(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("sda", tran="usb")
    res, _ = run_pre(fm)
    assert res.returncode != 0
    assert "no install disk found" in res.stderr
    stages = [p["stage"] for p in fm.progress()]
    assert stages[-1] == "failed"
    assert fm.progress()[-1]["token"] == TOKEN and fm.progress()[-1]["mac"] == MAC


def test_given_disk_is_used_even_if_not_first(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme")
    fm.disk("sdb", aliases=["/dev/disk/by-id/ata-DISK_B"])
    res, _ = run_pre(fm, disk="/dev/disk/by-id/ata-DISK_B")
    assert res.returncode == 0, res.stderr
    assert "ignoredisk --only-use=sdb\n" in fm.include


def test_given_disk_that_does_not_exist_fails(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("sda")
    res, _ = run_pre(fm, disk="/dev/sdz")
    assert res.returncode != 0 and "/dev/sdz is not a disk" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"


# -- fresh install layout ----------------------------------------------------------------------
GB = 10**9
EXPECTED_COMMON = {  # the seed's sizes (GB) in MiB, rounded up
    "swap": ("swap", seed_mib(27 * GB), False), "root": ("/", seed_mib(33 * GB), False),
    "var": ("/var", seed_mib(100 * GB), False), "varlog": ("/var/log", seed_mib(10 * GB), False),
    "home": ("/home", seed_mib(10 * GB), False), "srv": ("/srv", seed_mib(20 * GB), False),
}


@pytest.mark.parametrize("role", ["vanilla", "worker", "infra", "labcontroller"])
@pytest.mark.parametrize("uefi", [True, False])
def test_fresh_layout_per_role(tmp_path, role, uefi):
    fm = FakeMachine(tmp_path, uefi=uefi)
    fm.disk("nvme0n1", tran="nvme")
    res, text = run_pre(fm, role=role)
    assert res.returncode == 0, res.stderr
    h = spliced(text, fm.include)
    lvs = lv_table(h)
    expected = dict(EXPECTED_COMMON)
    if role == "worker":
        expected["longhorn"] = ("/var/lib/longhorn", 1, True)
    if role in ("infra", "labcontroller"):
        expected["rancher"] = ("/var/lib/rancher", seed_mib(20 * GB), False)
    assert {n: (v["mount"], v["size"], v["grow"]) for n, v in lvs.items()} == expected
    assert all(v["fstype"] == ("swap" if n == "swap" else "xfs") for n, v in lvs.items())
    assert all(lv.vgname == "labvg" for lv in h.logvol.lvList)
    assert [vg.vgname for vg in h.volgroup.vgList] == ["labvg"]
    parts = {p.mountpoint: p for p in h.partition.partitions}
    if uefi:
        assert parts["/boot/efi"].size == seed_mib(600 * 10**6) == 573 and parts["/boot/efi"].fstype == "efi"
        assert "biosboot" not in parts
    else:
        assert parts["biosboot"].fstype == "biosboot" and "/boot/efi" not in parts
    assert parts["/boot"].size == seed_mib(3 * GB) and parts["/boot"].fstype == "ext4"
    assert parts["pv.01"].grow
    assert h.clearpart.initAll and h.zerombr.zerombr
    assert h.ignoredisk.onlyuse == ["nvme0n1"]
    msgs = [p["message"] for p in fm.progress()]
    assert any("fresh install on /dev/nvme0n1" in m for m in msgs)


# -- reprovision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["vanilla", "worker", "infra", "labcontroller"])
def test_reprovision_keeps_data_volumes(tmp_path, role):
    fm = FakeMachine(tmp_path)
    fm.disk("sda")  # listed first among SATA, but labvg lives on the NVMe disk
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    # previously a worker: it has longhorn but no rancher volume
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn"])
    res, text = run_pre(fm, role=role)
    assert res.returncode == 0, res.stderr
    h = spliced(text, fm.include)
    assert not h.clearpart.initAll and not h.zerombr.zerombr
    parts = {p.mountpoint: p for p in h.partition.partitions}
    assert parts["/boot/efi"].onPart == "nvme0n1p1" and not parts["/boot/efi"].format  # reused as is
    assert parts["/boot"].onPart == "nvme0n1p2"  # reused (reformatted)
    assert "pv.01" not in parts
    vg = h.volgroup.vgList[0]
    assert vg.vgname == "labvg" and vg.preexist and not vg.format
    lvs = lv_table(h)
    for name in ("swap", "root", "var", "varlog"):  # recreated: existing volume, new file system
        assert lvs[name]["preexist"] and lvs[name]["format"], name
    for name in ("home", "srv"):  # preserved
        assert not lvs[name]["format"], name
    if role == "worker":
        assert not lvs["longhorn"]["format"]
    else:
        assert "longhorn" not in lvs  # left alone, not mounted
    if role in ("infra", "labcontroller"):
        # did not exist before: created in the existing volume group
        assert lvs["rancher"]["size"] == seed_mib(20 * GB) and lvs["rancher"]["format"] and not lvs["rancher"]["preexist"]
    msg = [p["message"] for p in fm.progress()][-1]
    assert msg.startswith("reprovision on /dev/nvme0n1: keeping /home /srv")


def test_reprovision_bios(tmp_path):
    fm = FakeMachine(tmp_path, uefi=False)
    fm.disk("sda", parts={"/dev/sda1": {"FSTYPE": "", "PARTTYPE": "21686148-6449-6e6f-744e-656564454649"},
                          "/dev/sda2": {"FSTYPE": "ext4"}, "/dev/sda3": {"FSTYPE": "LVM2_member"}})
    fm.labvg("/dev/sda3", ["swap", "root", "var", "varlog", "home", "srv"])
    res, text = run_pre(fm, role="vanilla")
    assert res.returncode == 0, res.stderr
    parts = {p.mountpoint: p for p in spliced(text, fm.include).partition.partitions}
    assert parts["biosboot"].onPart == "sda1" and parts["/boot"].onPart == "sda2"


def test_reprovision_on_another_disk_than_requested_fails(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    fm.disk("sda")
    fm.labvg("/dev/nvme0n1p3", ["root"])
    res, _ = run_pre(fm, disk="/dev/sda")
    assert res.returncode != 0
    assert "labvg exists on /dev/nvme0n1 but disk /dev/sda was requested" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"


def test_reprovision_given_disk_matching_labvg(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS, aliases=["/dev/disk/by-id/nvme-X"])
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv"])
    res, _ = run_pre(fm, role="vanilla", disk="/dev/disk/by-id/nvme-X")
    assert res.returncode == 0, res.stderr
    assert "logvol /home --vgname=labvg --name=home --noformat\n" in fm.include


def test_reprovision_without_efi_partition_fails_clearly(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts={"/dev/nvme0n1p3": {"FSTYPE": "LVM2_member"}})
    fm.labvg("/dev/nvme0n1p3", ["root"], free=400 * 10**9)  # room for the missing volumes
    res, _ = run_pre(fm)
    assert res.returncode != 0 and "no EFI system partition" in res.stderr


# -- progress payloads ----------------------------------------------------------------------------
def test_progress_payloads_are_json_with_the_install_token(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme")
    text = render()
    assert fm.run(script(text, "pre")).returncode == 0
    assert fm.run(script(text, "pre-install")).returncode == 0
    assert fm.run(script(text, "post", chroot=False)).returncode == 0
    assert fm.run(script(text, "onerror")).returncode == 0
    got = fm.progress()
    assert [p["stage"] for p in got] == ["partitioning", "partitioning", "packages", "complete", "failed"]
    for p in got:
        assert set(p) == {"mac", "token", "stage", "percent", "message"}
        assert p["mac"] == MAC and p["token"] == TOKEN and 0 <= p["percent"] <= 100


# -- network-first boot order and other systems' loaders (recorded `efibootmgr -v` outputs) ----------
# OVMF (QEMU) with efibootmgr 18: PXE, HTTP boot over IPv4 and IPv6 on each of two NICs, the boot
# NIC (52:54:00:12:34:56) first, then the installed system's entry.
EFI_OVMF = (
    "BootCurrent: 0001\n"
    "Timeout: 3 seconds\n"
    "BootOrder: 0007,0003,0004,0002,0001,0005,0006,0000\n"
    "Boot0000* UiApp\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)\n"
    "Boot0001* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400123456,1)"
    "/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)N.....YM....R,Y.\n"
    "Boot0002* UEFI PXEv6 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400123456,1)"
    "/IPv6([::]:<->[::]:,0,0)N.....YM....R,Y.\n"
    "Boot0003* UEFI HTTPv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400123456,1)"
    "/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)/Uri()N.....YM....R,Y.\n"
    "Boot0004* UEFI HTTPv6 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400123456,1)"
    "/IPv6([::]:<->[::]:,0,0)/Uri()N.....YM....R,Y.\n"
    "Boot0005* UEFI PXEv4 (MAC:525400ABCDEF)\tPciRoot(0x0)/Pci(0x3,0x0)/MAC(525400abcdef,1)"
    "/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)N.....YM....R,Y.\n"
    "Boot0006* UEFI PXEv6 (MAC:525400ABCDEF)\tPciRoot(0x0)/Pci(0x3,0x0)/MAC(525400abcdef,1)"
    "/IPv6([::]:<->[::]:,0,0)N.....YM....R,Y.\n"
    "Boot0007* Fedora\tHD(1,GPT,0b9d3d51-2d2b-4a86-9d3c-1c5c3f5e0a11,0x800,0x11e800)/File(\\EFI\\fedora\\shimx64.efi)\n"
)
# A server's firmware with an older efibootmgr (efivar's IPv4(...<->...) form): two ports of one
# card; the machine boots from the second port, the first port's PXE entry comes first.
EFI_SERVER = (
    "BootCurrent: 0003\n"
    "Timeout: 1 seconds\n"
    "BootOrder: 0000,0002,0004,0003,0005\n"
    "Boot0000* ubuntu\tHD(1,GPT,7e1b1c2a-9f0e-4c1e-8f7a-2a4b5c6d7e8f,0x800,0x100000)/File(\\EFI\\ubuntu\\shimx64.efi)\n"
    "Boot0002* UEFI: PXE IP4 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x0)"
    "/MAC(0cc47a0a0b0c,1)/IPv4(0.0.0.0:0<->0.0.0.0:0,0,0)..BO\n"
    "Boot0003* UEFI: PXE IP4 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x1)"
    "/MAC(525400123456,1)/IPv4(0.0.0.0:0<->0.0.0.0:0,0,0)..BO\n"
    "Boot0004* UEFI: PXE IP6 Intel(R) I350 Gigabit Network Connection\tPciRoot(0x0)/Pci(0x1c,0x0)/Pci(0x0,0x1)"
    "/MAC(525400123456,1)/IPv6([::]:<->[::]:,0,0)..BO\n"
    "Boot0005* UEFI: Built-in EFI Shell\tVenMedia(5023b95c-db26-429b-a648-bd47664c8012)..BO\n"
)
# No IPv4 PXE entry for the boot NIC (HTTP boot and IPv6 only): the order is left alone.
EFI_NO_PXE4 = "".join(line + "\n" for line in EFI_OVMF.splitlines()
                      if not line.startswith(("Boot0001", "Boot0005")))


def boot_functions(body: str) -> str:
    """The boot-entry snippet (scripts/_bootorder.sh.j2) out of a rendered %post or late-commands."""
    start = body.index("LAB_BOOT_MAC=")
    return body[start : body.index('\nlab_remove_other_loaders "', start) + 1]


@pytest.mark.parametrize("efi,order", [
    (EFI_OVMF, "0001,0007,0003,0004,0002,0005,0006,0000"),
    (EFI_SERVER, "0003,0000,0002,0004,0005"),
])
def test_boot_order_puts_only_the_boot_nics_ipv4_pxe_entry_first(tmp_path, efi, order):
    fm = FakeMachine(tmp_path)
    (tmp_path / "efi.txt").write_text(efi)
    res = fm.run(boot_functions(script(render(), "post")) + "lab_set_boot_order\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "bootorder").read_text() == order


def test_boot_order_unchanged_without_an_ipv4_pxe_entry_for_the_boot_nic(tmp_path):
    fm = FakeMachine(tmp_path)
    (tmp_path / "efi.txt").write_text(EFI_NO_PXE4)
    res = fm.run(boot_functions(script(render(), "post")) + "lab_set_boot_order\n")
    assert res.returncode == 1 and "no IPv4 PXE boot entry for NIC 525400123456" in res.stdout
    assert not (tmp_path / "bootorder").exists()


def test_boot_order_left_alone_on_bios(tmp_path):
    fm = FakeMachine(tmp_path, uefi=False)
    (tmp_path / "efi.txt").write_text(EFI_OVMF)
    res = fm.run(boot_functions(script(render(), "post")) + "lab_set_boot_order\n")
    assert res.returncode == 0 and not (tmp_path / "bootorder").exists()


def test_fedora_removes_other_systems_loaders_and_their_entries(tmp_path):
    fm = FakeMachine(tmp_path)
    (tmp_path / "efi.txt").write_text(EFI_SERVER)  # a former Ubuntu install: EFI/ubuntu and its entry 0000
    esp = tmp_path / "esp"
    for d in ("fedora", "ubuntu", "debian", "BOOT", "Dell"):
        (esp / "EFI" / d).mkdir(parents=True)
        (esp / "EFI" / d / "grub.cfg").write_text("stale\n")
    res = fm.run(boot_functions(script(render(), "post")) + f"lab_remove_other_loaders {esp}\n")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (esp / "EFI").iterdir()) == ["BOOT", "Dell", "fedora"]
    assert (tmp_path / "efibootmgr.log").read_text() == "-b 0000 -B\n"


def test_pre_runs_under_set_u_without_unbound_variables(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("vda", tran="")
    res, _ = run_pre(fm)
    assert "unbound variable" not in res.stderr and res.returncode == 0, res.stderr




# -- %post host setup, run for real against a fake root ------------------------------------------
@pytest.mark.parametrize("role", ["vanilla", "worker"])
def test_post_host_setup_writes_the_files(tmp_path, role):
    fm = FakeMachine(tmp_path)
    root = fm.target("root", fstab="UUID=x / xfs defaults 0 0\n", efi="BootOrder: 0001\nBoot0001* Fedora\n")
    body = script(render(role), "post")
    assert 'LAB_ROOT="" ' in body
    body = body.replace('LAB_ROOT="" ', f"LAB_ROOT={root} ", 1)
    res = fm.run(body)
    assert res.returncode == 0, res.stderr
    etc = root / "etc"
    assert "PasswordAuthentication no" in (etc / "ssh/sshd_config.d/10-lab-platform.conf").read_text()
    assert (etc / "sudoers.d/90-lab-admin").read_text() == "admin ALL=(ALL) NOPASSWD: ALL\n"
    assert oct((etc / "sudoers.d/90-lab-admin").stat().st_mode & 0o777) == "0o440"
    assert (etc / "sysctl.d/90-lab-sysrq.conf").read_text() == "kernel.sysrq = 1\n"
    fstab = (etc / "fstab").read_text()
    assert fstab.count("tmpfs /tmp tmpfs defaults,mode=1777,nosuid,nodev,size=4G 0 0") == 1
    ran = (tmp_path / "chroot.log").read_text().splitlines()
    assert "visudo -cf /etc/sudoers.d/90-lab-admin" in ran
    assert "systemctl enable chronyd.service" in ran
    if role == "worker":
        assert (etc / "modules-load.d/90-lab-k3s.conf").read_text() == "br_netfilter\noverlay\n"
        assert "net.ipv4.ip_forward = 1" in (etc / "sysctl.d/90-lab-k3s.conf").read_text()
        assert "systemctl mask firewalld.service" in ran
        assert not (root / "usr/local/bin/k3s").exists()  # the fake curl downloads nothing
    else:
        assert not (etc / "modules-load.d").exists() and not any("firewalld" in r for r in ran)
    stages = [(p["stage"], p["message"]) for p in fm.progress()]
    assert [s for s, _ in stages] == ["post-install"] * 4
    # running it twice (Anaconda never does, but idempotence is cheap) keeps one tmpfs line
    assert fm.run(body).returncode == 0
    assert (etc / "fstab").read_text().count("tmpfs /tmp") == 1


# -- room for the layout (checked in %pre, before anything is written) ------------------------------
GB_240 = 240 * 10**9 // 512  # sectors of a disk sold as 240 GB
GIB_20 = 20 * 2**30 // 512


@pytest.mark.parametrize("role", ["infra", "labcontroller", "worker"])
def test_fresh_install_fits_a_240_gb_disk(tmp_path, role):
    fm = FakeMachine(tmp_path)
    fm.disk("sda", size=GB_240)
    res, _ = run_pre(fm, role=role)
    assert res.returncode == 0, res.stderr
    assert "clearpart --all --initlabel --disklabel=gpt --drives=sda\n" in fm.include


def test_fresh_install_on_a_20_gib_disk_fails_with_the_numbers(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("vda", tran="", size=GIB_20)
    res, _ = run_pre(fm, role="infra")
    assert res.returncode != 0
    assert ("disk /dev/vda is too small for role infra: 20480 MiB (21 GB), the layout needs 213263 MiB (224 GB)"
            in res.stderr)
    assert fm.progress()[-1]["stage"] == "failed" and "20480 MiB" in fm.progress()[-1]["message"]
    assert not (tmp_path / "part-include").exists()  # nothing written for Anaconda


def test_reprovision_worker_to_infra_without_room_for_rancher_fails(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    # a worker's labvg: longhorn took the rest, 2 GiB are left; infra adds /var/lib/rancher (20 GB)
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn"], free=2 * 2**30)
    res, _ = run_pre(fm, role="infra")
    assert res.returncode != 0
    assert ("labvg on /dev/nvme0n1 has 2048 MiB free but role infra needs 19076 MiB for: /var/lib/rancher (19076 MiB)"
            in res.stderr)
    assert "lvremove labvg/NAME" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"
    assert not (tmp_path / "part-include").exists()


def test_reprovision_worker_to_infra_with_room_succeeds(tmp_path):
    fm = FakeMachine(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn"], free=19076 * 2**20)
    res, _ = run_pre(fm, role="infra")
    assert res.returncode == 0, res.stderr
    assert f"logvol /var/lib/rancher --vgname=labvg --name=rancher --fstype=xfs --size={seed_mib(20 * GB)}\n" in fm.include
