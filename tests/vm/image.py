"""Build (once) and cache the Debian 12 test VM image.

The image is a qcow2 holding a bare ext4 root filesystem (no partition table, no boot loader):
machines boot it with QEMU's direct kernel boot, using the kernel and initrd extracted from the
image's /boot at build time. It is built with debootstrap from the host's Debian mirror (the Debian
registry, the only place packages may come from), populated into the filesystem with
`mkfs.ext4 -d` (no loop device or nbd needed) and cached outside the repository under a name that
is a hash of every input, so a change to the package list or to the guest files rebuilds it and
nothing else does.

Artefacts for hash H (all in `cache_dir()`):
    debian12-H.qcow2     root filesystem (backing file for per-run overlays; never written to)
    debian12-H.vmlinuz   kernel
    debian12-H.initrd    initramfs
    debian12-H.key       SSH private key authorised for root in the guest (.pub next to it)
    debian12-H.json      build record: packages, seconds taken, sizes
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "packages.txt"
SUITE = "bookworm"
ROOTFS_SIZE = "6G"
# Bump when the build steps change in a way the inputs below do not show.
RECIPE_VERSION = "1"

# Files written into the guest after debootstrap. Part of the image hash.
GUEST_FILES: dict[str, str] = {
    "etc/fstab": "/dev/vda / ext4 defaults,noatime 0 1\n",
    "etc/hostname": "labvm\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 labvm\n",
    # QEMU user networking always gives the guest 10.0.2.15 (gateway .2, DNS .3): a static address
    # needs no DHCP exchange, which a heavily loaded TCG guest can time out on.
    "etc/systemd/network/10-eth.network": (
        "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\nLinkLocalAddressing=no\n"
    ),
    # TCG on a busy host is slow: give units, devices and watchdogs time instead of failing the boot.
    "etc/systemd/system.conf.d/10-labvm.conf": (
        "[Manager]\nDefaultTimeoutStartSec=900s\nDefaultDeviceTimeoutSec=900s\nRuntimeWatchdogSec=off\n"
    ),
    "etc/systemd/system/systemd-networkd.service.d/10-labvm.conf": "[Service]\nWatchdogSec=0\n",
    "etc/systemd/system/systemd-journald.service.d/10-labvm.conf": "[Service]\nWatchdogSec=0\n",
    "etc/systemd/system/systemd-logind.service.d/10-labvm.conf": "[Service]\nWatchdogSec=0\n",
    "etc/systemd/system/systemd-udevd.service.d/10-labvm.conf": "[Service]\nWatchdogSec=0\n",
    "etc/ssh/sshd_config.d/10-labvm.conf": (
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    ),
    # Test VMs have no network beyond the host's forwarded SSH port: nothing to wait for.
    "etc/systemd/journald.conf.d/10-labvm.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n",
    "etc/apt/apt.conf.d/90labvm": 'APT::Install-Recommends "false";\n',
}
# Units masked in the guest: timers and waits that only slow a throwaway test machine down.
MASKED_UNITS = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
]
ENABLED_UNITS = ["systemd-networkd.service"]
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet loglevel=4 random.trust_cpu=on apparmor=0"


def cache_dir() -> Path:
    """Where images (and running VMs' state) live: outside the repository."""
    env = os.environ.get("LAB_VM_CACHE")
    if env:
        base = Path(env)
    elif os.geteuid() == 0:
        base = Path("/var/cache/lab-platform/vm")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lab-platform" / "vm"
    base.mkdir(parents=True, exist_ok=True)
    return base


def read_packages() -> list[str]:
    lines = PACKAGES_FILE.read_text().splitlines()
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def host_mirror() -> str:
    """The host's Debian mirror (deb822 or one-line sources), default deb.debian.org."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in candidates:
        if not path.exists():
            continue
        text = path.read_text()
        for block in re.split(r"\n\s*\n", text):
            if re.search(rf"^Suites:.*\b{SUITE}\b", block, re.M):
                m = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if m and "security" not in m.group(1):
                    return m.group(1)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return "http://deb.debian.org/debian"


def image_hash() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(SUITE.encode())
    h.update(ROOTFS_SIZE.encode())
    h.update("\n".join(read_packages()).encode())
    h.update(json.dumps(GUEST_FILES, sort_keys=True).encode())
    h.update("\n".join(MASKED_UNITS + ENABLED_UNITS).encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    qcow2: Path
    kernel: Path
    initrd: Path
    key: Path
    record: Path

    @property
    def cmdline(self) -> str:
        return KERNEL_CMDLINE

    def info(self) -> dict:
        return json.loads(self.record.read_text())


def image_paths(digest: str | None = None) -> Image:
    digest = digest or image_hash()
    stem = cache_dir() / f"debian12-{digest}"
    return Image(
        qcow2=stem.with_suffix(".qcow2"),
        kernel=stem.with_suffix(".vmlinuz"),
        initrd=stem.with_suffix(".initrd"),
        key=stem.with_suffix(".key"),
        record=stem.with_suffix(".json"),
    )


def missing_tools() -> list[str]:
    tools = ["debootstrap", "mkfs.ext4", "qemu-img", "qemu-system-x86_64", "ssh", "ssh-keygen", "chroot"]
    return [t for t in tools if shutil.which(t) is None]


def is_built(image: Image | None = None) -> bool:
    image = image or image_paths()
    return all(p.exists() for p in (image.qcow2, image.kernel, image.initrd, image.key, image.record))


@contextlib.contextmanager
def file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"+ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, **kw)


def ensure_image(log_path: Path | None = None, echo=print) -> Image:
    """Return the cached image, building it first if needed (needs root: debootstrap, chroot)."""
    image = image_paths()
    if is_built(image):
        return image
    if os.geteuid() != 0:
        raise RuntimeError("building the VM image needs root (debootstrap); run `sudo python -m tests.vm build`")
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"missing tools to build the VM image: {', '.join(missing)} (make deps-system)")
    with file_lock(cache_dir() / "build.lock"):
        if is_built(image):
            return image
        log_path = log_path or image.record.with_suffix(".build.log")
        echo(f"building VM image {image.qcow2.name} (log: {log_path}); takes a few minutes, once")
        with open(log_path, "w") as log:
            _build(image, log)
    return image


def _build(image: Image, log) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="labvm-build-", dir=cache_dir()))
    root = work / "root"
    try:
        packages = read_packages()
        mirror = host_mirror()
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                SUITE,
                str(root),
                mirror,
            ],
            log,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        debootstrap_s = time.monotonic() - started
        # Guest files.
        for rel, content in GUEST_FILES.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        (root / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
        # SSH key for root (generated per image, kept next to it).
        for p in (image.key, image.key.with_suffix(".key.pub")):
            p.unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "labvm", "-f", str(image.key)], log)
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{image.key}.pub").read_text())
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        # Units.
        for unit in ENABLED_UNITS:
            _run(["chroot", str(root), "systemctl", "enable", unit], log)
        for unit in MASKED_UNITS:
            link = root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        _run(["chroot", str(root), "passwd", "-l", "root"], log)
        # Kernel and initrd for direct kernel boot.
        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError(f"no kernel/initrd in {boot}: {list(boot.iterdir())}")
        shutil.copy2(kernels[-1], image.kernel)
        shutil.copy2(initrds[-1], image.initrd)
        # Shrink: package archives are not needed in the guest.
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        # Filesystem image without mounting anything.
        raw = work / "root.ext4"
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", str(root), str(raw), ROOTFS_SIZE], log)
        tmp_qcow = image.qcow2.with_suffix(".qcow2.tmp")
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp_qcow)], log)
        os.chmod(tmp_qcow, 0o444)
        tmp_qcow.rename(image.qcow2)
        record = {
            "image": image.qcow2.name,
            "hash": image.qcow2.stem.split("-")[-1],
            "suite": SUITE,
            "mirror": mirror,
            "packages": packages,
            "kernel": kernels[-1].name,
            "build_seconds": round(time.monotonic() - started, 1),
            "debootstrap_seconds": round(debootstrap_s, 1),
            "qcow2_bytes": image.qcow2.stat().st_size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        image.record.write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
