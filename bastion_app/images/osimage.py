"""Build an installable operating system image: a Debian root filesystem as a compressed tarball.

``lab-bastion images build-os debian-12`` (or ``debian-13``) makes what the image deploy writes
onto a machine's disk (docs/installer.md, "Image deploy"):

1. ``debootstrap --variant=minbase`` of the OS's suite from the host's Debian mirror, with the
   packages an installed node needs (:data:`PACKAGES`: kernel, systemd, GRUB for BIOS *and* UEFI as
   the ``-bin`` packages, since ``grub-pc`` and ``grub-efi-amd64`` conflict; LVM, XFS, SSH, sudo,
   python3 for Ansible, chrony, and what the k3s roles install, so that they find it present);
2. the suite's ``-updates`` and ``-security`` archives added and ``apt-get upgrade`` run in the
   chroot (security updates applied at build time);
3. the image set up once for every machine (:data:`IMAGE_FILES`: a generic initramfs with LVM
   and the common storage drivers, GRUB defaults) and cleaned for cloning: an empty
   ``/etc/machine-id``, no SSH host keys, no build host name, no apt caches;
4. packed as ``rootfs.tar.zst`` (numeric owners, xattrs and ACLs kept) with ``rootfs.json``: its
   sha256 and size, the package list with versions, the inputs.

The result is cached under ``<cache>/<os>-<inputs hash>/`` (default
``/var/cache/lab-platform/os``) and published into ``<data>/images/<os>/``. The inputs are the
suite, the mirror, the package list, :data:`IMAGE_FILES` and :data:`RECIPE`: change one and the
next build makes a new image; otherwise a build is instant. ``--force`` rebuilds (to pick up new
security updates).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bastion_app.images import discovery
from bastion_app.images.discovery import publish
from labcore import bastion_files, domain

#: Bumped when the build steps change in a way the other inputs do not show.
RECIPE = 2

ROOTFS = bastion_files.ROOTFS
MANIFEST = bastion_files.ROOTFS_MANIFEST

#: What every installed node has (the image deploy's payload).
PACKAGES: tuple[str, ...] = (
    # boot: kernel, init, GRUB for both firmware kinds (the -bin packages: the meta packages conflict)
    "linux-image-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev", "dbus", "kmod",
    "grub-pc-bin", "grub-efi-amd64-bin", "grub2-common", "efibootmgr",
    # storage of the layout
    "lvm2", "xfsprogs", "dosfstools", "e2fsprogs",
    # reachable and manageable: SSH, sudo, python3 (Ansible), time
    "openssh-server", "sudo", "python3", "python3-apt", "chrony", "curl", "ca-certificates",
    "iproute2", "procps", "less", "zstd",
    # what the k3s roles install (roles/k3s_host_prep/vars/Debian.yml): present, so they need no mirror
    "iptables", "conntrack", "socat", "ethtool",
)

#: Files written into the image. Part of the inputs hash.
IMAGE_FILES: dict[str, str] = {
    # a generic initramfs: every storage and filesystem driver, not only the build host's
    "etc/initramfs-tools/conf.d/lab-platform.conf": "MODULES=most\nRESUME=none\n",
    # a short menu; no serial console (seed: console=ttyS0 costs 30 s per boot step on hardware
    # without a serial port)
    "etc/default/grub.d/lab-platform.cfg": "GRUB_TIMEOUT=2\nGRUB_DISABLE_OS_PROBER=true\n",
    "etc/apt/apt.conf.d/90lab-platform": 'APT::Install-Recommends "false";\n',
}

#: Removed before packing: what makes one machine differ from another, and caches.
CLEAN = ("etc/ssh/ssh_host_*", "var/lib/dbus/machine-id", "var/cache/apt/archives/*.deb",
         "var/cache/apt/*.bin", "var/lib/apt/lists/*_*", "var/log/*.log", "var/log/apt/*",
         "root/.bash_history", "etc/hostname")


class OsImageError(RuntimeError):
    """The image could not be built; the message says what to do."""


@dataclass(frozen=True)
class OsImage:
    os: str
    rootfs: Path
    manifest: Path
    size_bytes: int
    sha256: str
    inputs_hash: str
    cached: bool


def default_cache_dir() -> Path:
    """``/var/cache/lab-platform/os`` for root, else ``$XDG_CACHE_HOME/lab-platform/os`` (beside
    the discovery cache)."""
    return discovery.default_cache_dir().with_name("os")


def image_os(name: str) -> domain.OperatingSystem:
    """The image-deployed OS called ``name`` (OsImageError for another kind)."""
    try:
        o = domain.operating_system(name)
    except KeyError:
        o = None
    if o is None or o.installer != "image":
        images = [x.name for x in domain.OPERATING_SYSTEMS if x.installer == "image"]
        raise OsImageError(f"{name!r} is not an image-deployed OS (those are: {', '.join(images)})")
    return o


def host_mirror() -> str:
    """The host's Debian mirror (the first non-security ``debian`` archive in its apt sources, deb822
    or one-line); deb.debian.org when there is none. Every suite is taken from it."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        try:
            text = path.read_text()
        except OSError:
            continue
        uris = re.findall(r"^URIs:\s*(\S+)", text, re.M)
        uris += [parts[1] for parts in (line.split() for line in text.splitlines())
                 if len(parts) >= 3 and parts[0] == "deb"]
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def security_mirror(mirror: str) -> str:
    """Where ``<suite>-security`` lives beside ``mirror`` (``.../debian`` -> ``.../debian-security``)."""
    return mirror[: -len("/debian")] + "/debian-security" if mirror.endswith("/debian") else mirror + "-security"


def sources_list(suite: str, mirror: str) -> str:
    return (f"deb {mirror} {suite} main\n"
            f"deb {mirror} {suite}-updates main\n"
            f"deb {security_mirror(mirror)} {suite}-security main\n")


def inputs_hash(os_name: str, suite: str, mirror: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": RECIPE, "os": os_name, "suite": suite, "mirror": mirror,
                         "packages": PACKAGES, "files": IMAGE_FILES, "clean": CLEAN}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def _run(cmd: list[str], log, *, what: str = "", echo: Callable[[str], object] | None = None) -> str:
    """Run ``cmd``, its output streamed into the build log (and its ``I: ...`` lines, which are
    debootstrap's steps, to ``echo``); returns the output. OsImageError with the last lines."""
    log.write(f"+ {' '.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise OsImageError(f"`{cmd[0]}` not found: {what or 'install it (make deps-system)'}") from None
    lines = []
    last = 0.0
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
        if echo and line.startswith("I: ") and time.monotonic() - last >= 10:
            last = time.monotonic()
            echo("  " + line[3:].strip())
    proc.wait()
    if proc.returncode != 0:
        tail = "".join(lines[-15:]).strip()
        raise OsImageError(f"`{' '.join(cmd[:4])}...` failed ({proc.returncode}); see {log.name}:\n{tail}")
    return "".join(lines)


def _unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below ``path`` (deepest first): a build that was killed can
    leave debootstrap's or the chroot's /proc, /sys and /dev mounted, and removing the directory
    then would walk into the host's /dev."""
    prefix = str(path.resolve())
    try:
        mounts = [line.split()[1].replace("\\040", " ") for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return
    for target in sorted((m for m in mounts if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def _remove_build_dir(work: Path) -> None:
    _unmount_below(work)
    if any(line.split()[1].startswith(str(work.resolve()) + "/")
           for line in Path("/proc/mounts").read_text().splitlines()):
        raise OsImageError(f"{work} still has file systems mounted below it: not removing it")
    shutil.rmtree(work, ignore_errors=True)


class _Mounts:
    """/proc, /sys and /dev inside the chroot while packages configure themselves."""

    def __init__(self, root: Path, log):
        self.root, self.log, self.done = root, log, []

    def __enter__(self):
        for src, rel, opts in (("proc", "proc", ["-t", "proc"]), ("/sys", "sys", ["--rbind"]),
                               ("/dev", "dev", ["--rbind"])):
            target = self.root / rel
            target.mkdir(exist_ok=True)
            _run(["mount", *opts, src, str(target)], self.log)
            self.done.append(target)
        return self

    def __exit__(self, *exc):
        _unmount_below(self.root)


def _build(o: domain.OperatingSystem, work: Path, mirror: str, digest: str, log,
           progress: Callable[[str], object]) -> dict:
    root = work / "root"
    started = time.monotonic()
    progress(f"{o.name}: debootstrap {o.suite} from {mirror} ({len(PACKAGES)} packages and their dependencies)")
    debs = work.parent / f"debs-{o.suite}"  # downloaded packages, kept for the next build
    debs.mkdir(exist_ok=True)
    _run(["debootstrap", "--variant=minbase", "--components=main", f"--cache-dir={debs}",
          f"--include={','.join(PACKAGES)}",
          o.suite, str(root), mirror], log, what="install debootstrap (make deps-system)", echo=progress)
    debootstrap_s = time.monotonic() - started
    for rel, content in IMAGE_FILES.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    (root / "etc/apt/sources.list").write_text(sources_list(o.suite, mirror))
    # no daemon may start inside the chroot while packages are upgraded
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        with _Mounts(root, log):
            progress(f"{o.name}: applying {o.suite}-updates and {o.suite}-security")
            _run(["chroot", str(root), "apt-get", "update", "-q"], log)
            upgraded = _run(["chroot", str(root), "apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                             "dist-upgrade"], log)
            # a security update can bring a new kernel ABI beside debootstrap's: keep only the
            # one linux-image-amd64 depends on (each kernel is ~400 MB of modules)
            wanted = re.search(r"(linux-image-[0-9]\S*-amd64)", _run(
                ["chroot", str(root), "dpkg-query", "-W", "-f", "${Depends}", "linux-image-amd64"], log))
            kernels = _run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}\\n", "linux-image-[0-9]*"], log)
            old = [k for k in kernels.split() if wanted and k != wanted.group(1)]
            if old:
                progress(f"{o.name}: removing superseded kernels {', '.join(old)}")
                _run(["chroot", str(root), "apt-get", "-y", "-q", "purge", *old], log)
            progress(f"{o.name}: generic initramfs (MODULES=most, LVM)")
            _run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], log)
            packages = _run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"], log)
    finally:
        policy.unlink(missing_ok=True)
    # cleaned for cloning: systemd makes a machine id on first boot; the installer writes the host
    # name and makes new SSH host keys
    for pattern in CLEAN:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("localhost\n")
    kernels = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
    if not kernels or not list((root / "boot").glob("initrd.img-*")):
        raise OsImageError(f"the image has no kernel or initramfs in /boot: {sorted(os.listdir(root / 'boot'))}")
    upgrades = re.findall(r"^(\d+) upgraded, (\d+) newly installed", upgraded, re.M)

    progress(f"{o.name}: packing {ROOTFS} (zstd)")
    out = work / ROOTFS
    with open(out, "wb") as fh:
        tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
                                "--sort=name", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE,
                               stderr=log)
        zstd = subprocess.run(["zstd", "-q", "-T0", "-6", "-c"], stdin=tar.stdout, stdout=fh, stderr=log)
        tar.stdout.close()
        if tar.wait() != 0 or zstd.returncode != 0:
            raise OsImageError(f"packing the image failed (tar {tar.returncode}, zstd {zstd.returncode}); see {log.name}")
    sha = hashlib.sha256()
    with open(out, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    du = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True).stdout.split()
    return {
        "os": o.name, "suite": o.suite, "mirror": mirror, "inputs_hash": digest, "recipe": RECIPE,
        "file": ROOTFS, "size_bytes": out.stat().st_size, "sha256": sha.hexdigest(),
        "unpacked_bytes": int(du[0]) if du else None,
        "kernel": kernels[-1][len("vmlinuz-"):],
        "packages": sorted(line for line in packages.splitlines() if line),
        "requested_packages": list(PACKAGES),
        "updates_applied": {"upgraded": int(upgrades[-1][0]), "newly_installed": int(upgrades[-1][1])}
        if upgrades else {},
        "build_seconds": round(time.monotonic() - started, 1),
        "debootstrap_seconds": round(debootstrap_s, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_manifest(images_dir: Path, os_name: str) -> dict | None:
    """The published image's manifest (``<images>/<os>/rootfs.json``), or None when there is none."""
    try:
        doc = json.loads((Path(images_dir) / os_name / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def build_os(os_name: str, images_dir: Path, *, cache_dir: Path | None = None,
             progress: Callable[[str], object] = print, force: bool = False) -> OsImage:
    """Build (or take from the cache) the image of ``os_name`` and publish it in
    ``<images_dir>/<os_name>/``. Raises :class:`OsImageError`."""
    o = image_os(os_name)
    if os.geteuid() != 0:
        raise OsImageError("building an OS image needs root (debootstrap, chroot)")
    missing = [t for t in ("debootstrap", "chroot", "tar", "zstd", "mount") if shutil.which(t) is None]
    if missing:
        raise OsImageError(f"missing tools: {', '.join(missing)} (make deps-system)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    mirror = host_mirror()
    digest = inputs_hash(o.name, o.suite, mirror)
    final = cache / f"{o.name}-{digest}"
    out = Path(images_dir) / o.name
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = (final / MANIFEST).is_file() and not force
        for stale in cache.glob(".build-*"):  # a build that was killed (the lock is free, so it is not running)
            _remove_build_dir(stale)
        if cached:
            progress(f"{o.name}: cached image {final.name}")
        else:
            work = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{o.name}-"))
            try:
                with open(cache / f"{o.name}-{digest}.build.log", "w") as log:
                    manifest = _build(o, work, mirror, digest, log, progress)
                _remove_build_dir(work / "root")
                (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(work, final)
            finally:
                if work.exists():
                    _remove_build_dir(work)
            for old in cache.glob(f"{o.name}-*"):
                if old.is_dir() and old != final:
                    shutil.rmtree(old, ignore_errors=True)
        manifest = json.loads((final / MANIFEST).read_text())
        publish(final / ROOTFS, out / ROOTFS)
        publish(final / MANIFEST, out / MANIFEST)
    progress(f"{o.name}: {out / ROOTFS}, {manifest['size_bytes'] / 1e6:.1f} MB "
             f"({manifest['unpacked_bytes'] / 1e6:.0f} MB unpacked, {len(manifest['packages'])} packages, "
             f"kernel {manifest['kernel']}), {time.monotonic() - started:.1f} s")
    return OsImage(os=o.name, rootfs=out / ROOTFS, manifest=out / MANIFEST, size_bytes=int(manifest["size_bytes"]),
                   sha256=manifest["sha256"], inputs_hash=digest, cached=cached)
