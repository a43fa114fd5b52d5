"""Ubuntu autoinstall (cloud-init NoCloud): valid cloud-config, valid against subiquity's
autoinstall schema, the labvg layout per role, and the early/late/error commands run for real in
bash against a fake machine (the same fakes as the kickstart's %pre)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.installers import autoinstall_meta_data, autoinstall_user_data
from tests.support import KEY, MAC, NVME_PARTS, TOKEN, FakeMachine, install_params, need, seed_mib

# subiquity's published schema, kept beside the repository (../shared/schemas); LAB_AUTOINSTALL_SCHEMA
# names another copy.
SCHEMA_PATH = Path(os.environ.get("LAB_AUTOINSTALL_SCHEMA") or
                   Path(__file__).resolve().parents[3] / "shared" / "schemas" / "ubuntu-autoinstall-schema.json")
ROLES = ["vanilla", "worker", "infra", "labcontroller"]
BASE = "http://10.0.0.1:8080"


def machine(role="worker", disk=""):
    return install_params(role, disk, os_name="ubuntu-26.04")


def render(role="worker", disk=""):
    return autoinstall_user_data(machine(role, disk), base=BASE, manifest=DEFAULT_MANIFEST)


def schema():
    need(SCHEMA_PATH.exists(), f"needs the subiquity schema at {SCHEMA_PATH}")
    return json.loads(SCHEMA_PATH.read_text())


def command(doc: dict, key: str) -> str:
    [cmd] = doc["autoinstall"][key]
    assert cmd[:2] == ["bash", "-c"]
    return cmd[2]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("disk", ["", "/dev/nvme0n1"])
def test_valid_cloud_config_and_autoinstall_schema(role, disk):
    text = render(role, disk)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert set(doc) == {"autoinstall"}
    jsonschema.validate(doc["autoinstall"], schema())
    ai = doc["autoinstall"]
    assert ai["version"] == 1
    assert ai["reporting"]["lab-bastion"] == {"type": "webhook",
                                              "endpoint": f"{BASE}/api/installer-events/{MAC}/{TOKEN}"}
    assert ai["ssh"] == {"install-server": True, "allow-pw": False}
    ud = ai["user-data"]
    assert ud["hostname"] == "node1"
    [admin] = ud["users"]
    assert admin["name"] == "admin" and admin["lock_passwd"] is True
    assert admin["sudo"] == "ALL=(ALL) NOPASSWD:ALL" and admin["ssh_authorized_keys"] == [KEY]
    assert ai["apt"]["mirror-selection"]["primary"] == [{"uri": "http://archive.ubuntu.com/ubuntu"}]
    disk_item = ai["storage"]["config"][0]
    assert disk_item["path"] == (disk or "/dev/lab-auto-detected")


def storage(doc) -> dict[str, dict]:
    items = doc["autoinstall"]["storage"]["config"]
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids))
    seen = set()
    for i in items:  # every reference points at an item defined before it
        for ref in [i.get("device"), i.get("volume"), i.get("volgroup"), *i.get("devices", [])]:
            assert ref is None or ref in seen, (i["id"], ref)
        seen.add(i["id"])
    return {i["id"]: i for i in items}


@pytest.mark.parametrize("role", ROLES)
def test_layout_per_role(role):
    doc = yaml.safe_load(render(role))
    s = storage(doc)
    assert doc["autoinstall"]["storage"]["swap"] == {"size": 0}
    assert s["lab-efi"]["size"] == f"{seed_mib(600 * 10**6)}M" and s["lab-efi-fs"]["fstype"] == "fat32"
    assert s["lab-efi-mount"]["path"] == "/boot/efi"
    assert s["lab-boot"]["size"] == f"{seed_mib(3 * 10**9)}M" and s["lab-boot-mount"]["path"] == "/boot"
    assert s["lab-vg"]["name"] == "labvg" and s["lab-vg"]["devices"] == ["lab-pv"]
    lvs = {i["name"]: i.get("size") for i in s.values() if i["type"] == "lvm_partition"}
    mounts = {s[i["device"]]["volume"]: i["path"] for i in s.values() if i["type"] == "mount"}
    # the seed's sizes are GB (decimal), in MiB rounded up: swap 27 GB is 25750 MiB
    expected = {name: f"{seed_mib(gb * 10**9)}M" for name, gb in
                (("swap", 27), ("root", 33), ("var", 100), ("varlog", 10), ("home", 10), ("srv", 20))}
    assert expected["swap"] == "25750M"
    if role == "worker":
        expected["longhorn"] = None  # the rest of labvg
    if role in ("infra", "labcontroller"):
        expected["rancher"] = f"{seed_mib(20 * 10**9)}M"
    assert lvs == expected
    assert mounts["lab-lv-root"] == "/" and mounts["lab-lv-home"] == "/home" and mounts["lab-lv-swap"] == "none"
    assert s["lab-fs-swap"]["fstype"] == "swap" and s["lab-fs-var"]["fstype"] == "xfs"
    sized = [i for i in s.values() if i["type"] == "lvm_partition"]
    assert all("size" in i for i in sized[:-1])  # only the last volume takes the rest
    pkgs = doc["autoinstall"]["packages"]
    assert "chrony" in pkgs and (("conntrack" in pkgs) == (role != "vanilla"))


def fake_ubuntu(tmp_path: Path, uefi=True) -> FakeMachine:
    fm = FakeMachine(tmp_path, uefi=uefi)
    (fm.bin / "python3").symlink_to(sys.executable)  # a python3 with PyYAML, like the live installer's
    return fm


@pytest.mark.parametrize("uefi", [True, False])
@pytest.mark.parametrize("wrapped", [True, False])
def test_early_commands_pick_the_disk_and_grub_target(tmp_path, uefi, wrapped):
    text = render()
    doc = yaml.safe_load(text)
    fm = fake_ubuntu(tmp_path, uefi)
    fm.disk("sda", tran="usb")
    fm.disk("sdb")
    fm.disk("nvme0n1", tran="nvme")
    ai_file = tmp_path / "autoinstall.yaml"
    ai_file.write_text(yaml.safe_dump(doc if wrapped else doc["autoinstall"]))
    body = command(doc, "early-commands")
    res = fm.run(f"export LAB_AUTOINSTALL={ai_file}\n" + body)
    assert res.returncode == 0, res.stderr
    out = yaml.safe_load(ai_file.read_text())
    s = {i["id"]: i for i in (out["autoinstall"] if wrapped else out)["storage"]["config"]}
    assert s["lab-disk"]["path"] == "/dev/nvme0n1"
    assert s["lab-disk"]["grub_device"] is (not uefi) and s["lab-efi"]["grub_device"] is uefi
    jsonschema.validate(out["autoinstall"] if wrapped else out, schema())
    stages = [(p["stage"], p["message"]) for p in fm.progress()]
    assert stages[-1] == ("partitioning", f"fresh install on /dev/nvme0n1 ({'uefi' if uefi else 'bios'})")


def test_early_commands_fail_without_a_disk(tmp_path):
    doc = yaml.safe_load(render())
    fm = fake_ubuntu(tmp_path)
    fm.disk("sda", tran="usb")
    ai_file = tmp_path / "autoinstall.yaml"
    ai_file.write_text(yaml.safe_dump(doc))
    res = fm.run(f"export LAB_AUTOINSTALL={ai_file}\n" + command(doc, "early-commands"))
    assert res.returncode != 0 and "no install disk found" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"
    assert yaml.safe_load(ai_file.read_text()) == doc  # left as it was


@pytest.mark.parametrize("role", ["vanilla", "worker", "infra"])
def test_early_commands_reprovision_keeps_the_data_volumes(tmp_path, role):
    doc = yaml.safe_load(render(role))
    fm = fake_ubuntu(tmp_path)
    fm.disk("sda")
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn"])
    ai_file = tmp_path / "autoinstall.yaml"
    ai_file.write_text(yaml.safe_dump(doc))
    res = fm.run(f"export LAB_AUTOINSTALL={ai_file}\n" + command(doc, "early-commands"))
    assert res.returncode == 0, res.stderr
    out = yaml.safe_load(ai_file.read_text())
    jsonschema.validate(out["autoinstall"], schema())
    s = storage(out)
    assert s["lab-disk"] == {"type": "disk", "id": "lab-disk", "path": "/dev/nvme0n1", "ptable": "gpt",
                             "preserve": True, "grub_device": False}
    parts = {i["number"]: i for i in s.values() if i["type"] == "partition"}
    assert all(p["preserve"] for p in parts.values())  # the partition table is kept as it is
    assert parts[1]["flag"] == "boot" and parts[1]["grub_device"] is True and parts[1]["size"] == 2**30
    assert parts[3]["size"] == 3 * 2**30
    assert s["lab-vg"] == {"type": "lvm_volgroup", "id": "lab-vg", "name": "labvg", "devices": ["lab-part3"],
                           "preserve": True}
    assert s["lab-efi-fs"]["preserve"] is True and s["lab-efi-fs"]["volume"] == "lab-part1"
    assert s["lab-boot-fs"]["preserve"] is False and s["lab-boot-fs"]["volume"] == "lab-part2"
    lvs = {i["name"]: i for i in s.values() if i["type"] == "lvm_partition"}
    fs = {i["volume"]: i for i in s.values() if i["type"] == "format"}
    for name in ("swap", "root", "var", "varlog", "home", "srv"):  # existing: kept as volumes
        assert lvs[name]["preserve"] is True and lvs[name]["size"] == "10737418240B"
    for name in ("swap", "root", "var", "varlog"):  # recreated: new file system
        assert fs[f"lab-lv-{name}"]["preserve"] is False
    for name in ("home", "srv"):  # kept
        assert fs[f"lab-lv-{name}"]["preserve"] is True
    if role == "worker":
        assert lvs["longhorn"]["preserve"] is True and fs["lab-lv-longhorn"]["preserve"] is True
    else:
        assert "longhorn" not in lvs  # a former role's volume is left alone
    if role == "infra":  # did not exist: created in the kept volume group
        assert lvs["rancher"] == {"type": "lvm_partition", "id": "lab-lv-rancher", "volgroup": "lab-vg",
                                  "name": "rancher", "size": f"{seed_mib(20 * 10**9)}M", "preserve": False}
    msg = fm.progress()[-1]["message"]
    assert msg == "reprovision on /dev/nvme0n1: keeping /home /srv" + (" /var/lib/longhorn" if role == "worker" else "")


def test_early_commands_reprovision_without_boot_partition_fails(tmp_path):
    doc = yaml.safe_load(render())
    fm = fake_ubuntu(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts={"/dev/nvme0n1p1": {"FSTYPE": "LVM2_member"}})
    fm.labvg("/dev/nvme0n1p1", ["root"], free=400 * 10**9)  # room for the missing volumes
    ai_file = tmp_path / "autoinstall.yaml"
    ai_file.write_text(yaml.safe_dump(doc))
    res = fm.run(f"export LAB_AUTOINSTALL={ai_file}\n" + command(doc, "early-commands"))
    assert res.returncode != 0 and "no boot partition on /dev/nvme0n1" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"
    assert yaml.safe_load(ai_file.read_text()) == doc


@pytest.mark.parametrize("role", ["vanilla", "infra"])
def test_late_commands_set_up_target_and_report_complete(tmp_path, role):
    doc = yaml.safe_load(render(role))
    fm = fake_ubuntu(tmp_path)
    # reprovisioned from Fedora: its loader folder and boot entry are still there
    efi = ("BootOrder: 0000,0002,0001\n"
           "Boot0000* ubuntu\tHD(1,GPT,5d1c...,0x800,0x11e800)/File(\\EFI\\ubuntu\\shimx64.efi)\n"
           "Boot0001* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400123456,1)"
           "/IPv4(0.0.0.0,0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)N.....YM....R,Y.\n"
           "Boot0002* Fedora\tHD(1,GPT,5d1c...,0x800,0x11e800)/File(\\EFI\\fedora\\shimx64.efi)\n")
    target = fm.target("target", fstab="", efi=efi)
    for d in ("fedora", "ubuntu", "BOOT"):
        (target / "boot/efi/EFI" / d).mkdir(parents=True)
    body = command(doc, "late-commands")
    assert "LAB_ROOT=/target " in body
    res = fm.run(body.replace("LAB_ROOT=/target ", f"LAB_ROOT={target} ", 1))
    assert res.returncode == 0, res.stderr
    assert (target / "root/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert (target / "etc/sudoers.d/90-lab-admin").exists()
    assert "size=4G" in (target / "etc/fstab").read_text()
    ran = (tmp_path / "chroot.log").read_text()
    assert "systemctl enable chrony.service" in ran
    assert ("systemctl mask ufw.service" in ran) == (role == "infra")
    assert sorted(p.name for p in (target / "boot/efi/EFI").iterdir()) == ["BOOT", "ubuntu"]
    assert (tmp_path / "efibootmgr.log").read_text() == "-b 0002 -B\n"
    assert (tmp_path / "bootorder").read_text() == "0001,0000,0002"  # the fake does not delete 0002
    stages = [p["stage"] for p in fm.progress()]
    assert stages[:4] == ["post-install"] * 4 and stages[-1] == "complete"


def test_error_commands_report_failed(tmp_path):
    doc = yaml.safe_load(render())
    fm = fake_ubuntu(tmp_path)
    assert fm.run(command(doc, "error-commands")).returncode == 0
    [p] = fm.progress()
    assert p["stage"] == "failed" and p["token"] == TOKEN and p["mac"] == MAC


def test_meta_data():
    doc = yaml.safe_load(autoinstall_meta_data(machine()))
    assert doc["local-hostname"] == "node1"
    assert doc["instance-id"].startswith("lab-525400123456-") and TOKEN not in doc["instance-id"]


def test_no_serial_console_or_tail():
    for role in ROLES:
        text = render(role)
        assert "ttyS" not in text and "tail -f" not in text




# -- room for the layout (checked in the early-commands, before the storage config is rewritten) ----
def early(tmp_path, fm: FakeMachine, role: str, disk: str = ""):
    doc = yaml.safe_load(render(role, disk))
    ai_file = tmp_path / "autoinstall.yaml"
    ai_file.write_text(yaml.safe_dump(doc))
    res = fm.run(f"export LAB_AUTOINSTALL={ai_file}\n" + command(doc, "early-commands"))
    return res, doc, yaml.safe_load(ai_file.read_text())


def test_early_commands_fit_infra_on_a_240_gb_disk(tmp_path):
    fm = fake_ubuntu(tmp_path)
    fm.disk("sda", size=240 * 10**9 // 512)
    res, _, out = early(tmp_path, fm, "infra")
    assert res.returncode == 0, res.stderr
    assert storage(out)["lab-disk"]["path"] == "/dev/sda"


def test_early_commands_refuse_a_20_gib_disk_with_the_numbers(tmp_path):
    fm = fake_ubuntu(tmp_path)
    fm.disk("vda", tran="", size=20 * 2**30 // 512)
    res, doc, out = early(tmp_path, fm, "worker")
    assert res.returncode != 0
    assert "disk /dev/vda is too small for role worker: 20480 MiB (21 GB), the layout needs 194191 MiB (204 GB)" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"
    assert out == doc  # the storage config is left as it was


def test_early_commands_refuse_worker_to_infra_without_room(tmp_path):
    fm = fake_ubuntu(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn"], free=0)
    res, doc, out = early(tmp_path, fm, "infra")
    assert res.returncode != 0
    assert "labvg on /dev/nvme0n1 has 0 MiB free but role infra needs 19076 MiB for: /var/lib/rancher (19076 MiB)" in res.stderr
    assert fm.progress()[-1]["stage"] == "failed"
    assert out == doc


def test_early_commands_give_subiquity_the_kernel_name_of_a_by_id_disk(tmp_path):
    # subiquity matches a disk action's path exactly against the probed /dev/<name> paths
    fm = fake_ubuntu(tmp_path)
    fm.disk("nvme0n1", tran="nvme")
    fm.disk("sdb", aliases=["/dev/disk/by-id/ata-DISK_B"])
    res, _, out = early(tmp_path, fm, "worker", disk="/dev/disk/by-id/ata-DISK_B")
    assert res.returncode == 0, res.stderr
    assert storage(out)["lab-disk"]["path"] == "/dev/sdb"
    jsonschema.validate(out["autoinstall"], schema())


def test_early_commands_reprovision_by_id_disk_uses_the_kernel_name(tmp_path):
    fm = fake_ubuntu(tmp_path)
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS, aliases=["/dev/disk/by-id/nvme-X"])
    fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv"])
    res, _, out = early(tmp_path, fm, "vanilla", disk="/dev/disk/by-id/nvme-X")
    assert res.returncode == 0, res.stderr
    assert storage(out)["lab-disk"]["path"] == "/dev/nvme0n1"
