"""The VM harness's promises: its fixed settings (without booting anything) and the warm start
(two VMs resumed from the booted snapshot, as the molecule scenarios get them)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import need_binary, need_root
from tests.vm import image, machine


def test_cache_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_VM_CACHE", str(tmp_path / "cache"))
    assert image.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LAB_VM_CACHE")
    repo = Path(__file__).resolve().parents[2]
    assert repo not in image.cache_dir().parents


def test_image_hash_covers_its_inputs(monkeypatch):
    base = image.image_hash()
    assert base == image.image_hash()
    monkeypatch.setattr(image, "read_packages", lambda: ["systemd", "python3", "another"])
    assert image.image_hash() != base
    monkeypatch.undo()
    monkeypatch.setitem(image.GUEST_FILES, "etc/motd", "hello\n")
    assert image.image_hash() != base


def test_packages_list_has_what_ansible_and_the_roles_need():
    packages = set(image.read_packages())
    assert {"python3", "python3-apt", "openssh-server", "linux-image-amd64", "systemd-sysv"} <= packages
    assert {"chrony", "iptables", "open-iscsi", "nfs-common", "conntrack", "socat"} <= packages


def test_qemu_is_isolated_tcg_with_a_loopback_ssh_port(tmp_path):
    img = image.image_paths("0" * 12)
    argv = machine.qemu_argv(img, tmp_path / "d.qcow2", tmp_path / "c.log", 2222, 2048, 2, tmp_path / "pid", "vm1")
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg"
    nic = argv[argv.index("-nic") + 1]
    assert "restrict=on" in nic and "hostfwd=tcp:127.0.0.1:2222-:22" in nic
    assert f"-kernel {img.kernel}" in joined and f"-initrd {img.initrd}" in joined
    append = argv[argv.index("-append") + 1]
    assert "console=ttyS0" in append and "root=/dev/vda" in append and "systemd.hostname=vm1" in append
    assert f"file:{tmp_path / 'c.log'}" in joined


def test_hostnames_are_rfc1123():
    assert machine._hostname("k3s-server-1") == "k3s-server-1"
    assert machine._hostname("Bench_K3S rerun!") == "bench-k3s-rerun"


@pytest.mark.slow
def test_warm_started_vms_have_their_own_name_clock_disk_and_identity(monkeypatch):
    need_root()
    need_binary("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh")
    monkeypatch.delenv("LAB_VM_WARM", raising=False)
    vms = []
    try:
        for name in ("warmtest-a", "warmtest-b"):
            vms.append(machine.up(name, memory_mb=1536, cpus=1))
        identities = set()
        for vm in vms:
            hostname, now, machine_id, host_key = vm.ssh(
                "hostname; date +%s; cat /etc/machine-id; cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()
            assert hostname == vm.name
            assert abs(int(now) - time.time()) < 60, "the resumed guest kept the snapshot's clock"
            assert len(machine_id) == 32
            identities |= {machine_id, host_key}
            assert vm.ssh("true").returncode == 0  # sshd answers with its new host keys
        assert len(identities) == 4, "the warm-started VMs share a machine-id or an SSH host key"
        vms[0].ssh("touch /root/only-in-a")
        assert vms[1].ssh("test -e /root/only-in-a", check=False).returncode == 1, "the VMs share a disk"
    finally:
        for vm in vms:
            vm.stop()
