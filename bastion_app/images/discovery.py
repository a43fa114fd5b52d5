"""Build the discovery environment: a small Linux kernel + initramfs made from Debian's packages.

A machine that PXE-boots and is unknown to the bastion boots this image. Its /init (a busybox shell
script under ``discovery/``) brings up the network, collects the hardware inventory and POSTs it to
``<lab.url>/api/discover``, then powers off. See docs/discovery.md.

The build:

1. resolves ``linux-image-amd64`` to the concrete kernel package (``linux-image-6.x-amd64``) and
   ``busybox-static`` to their candidate versions with ``apt-cache`` (no network);
2. hashes its inputs (package versions, every file under ``discovery/``, the module list, the build
   format); when ``<cache>/<hash>/`` exists, that is the result (a second build is instant: the
   package resolution is remembered too, until apt's lists or sources change);
3. otherwise fetches both packages with ``apt-get download`` (nothing is installed on the host),
   unpacks them with ``dpkg-deb -x`` into a scratch directory, takes vmlinuz, busybox and the wanted
   modules plus their dependencies (read from each module's ``.modinfo`` ELF section: Debian's
   package ships no ``modules.dep``, it is made by ``depmod`` at install time), and writes a gzip'd
   newc cpio archive itself (device nodes need no root);
4. copies (hard-links when it can) ``vmlinuz``, ``initrd.img`` and ``manifest.json`` into ``out_dir``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Bumped when the layout of the image changes in a way the other inputs do not capture.
BUILD_FORMAT = 5

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Directory with the init script, the udhcpc script and the shell library (package data).
SOURCE_DIR = Path(__file__).with_name("discovery")

#: Modules the image loads, by name (``-`` and ``_`` are the same). Dependencies are added.
#: Built-in modules (af_packet on Debian) are accepted and skipped.
MODULES: tuple[str, ...] = (
    # virtual machines
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "vmxnet3",
    # common server and desktop NICs (firmware-less paths; see docs/discovery.md)
    "e1000", "e1000e", "igb", "igc", "ixgbe", "i40e", "r8169", "tg3", "bnx2",
    # storage
    "nvme", "ahci", "ata_piix", "sd_mod", "sr_mod",
    # USB keyboards and removable disks
    "xhci_pci", "ehci_pci", "usb_storage", "uas",
    # packet sockets for udhcpc (built in on Debian)
    "af_packet",
    # the IPMI BMC's /dev/ipmi0 (ipmi_si is loaded when SMBIOS or ACPI describes a BMC: see init)
    "ipmi_msghandler", "ipmi_devintf", "ipmi_si",
)

#: Host tools copied into the image under ``/opt/lab/bin`` with the shared libraries ``ldd`` names
#: (``scripts/apt-packages.txt`` installs them): ``ipmitool lan print`` reads the BMC's LAN address.
HOST_TOOLS: tuple[str, ...] = ("ipmitool",)

#: Kernel command-line arguments /init understands (documented in docs/discovery.md).
CMDLINE_ARGS = {
    "BOOTIF": "01-aa-bb-cc-dd-ee-ff: the NIC that PXE-booted (iPXE: BOOTIF=01-${netX/mac:hexhyp})",
    "lab.url": "http://BASTION:PORT: where to POST /api/discover (an IP address: no DNS lookups)",
    "lab.action": "poweroff (default) | reboot | shell: what to do after the inventory was accepted",
    "lab.retries": "how many times to try the POST before giving up (default 8)",
    "lab.debug": "1: trace the init script (set -x)",
    "lab.modules": "all: load every driver in the image (default: PCI drivers only for the devices present)",
    "lab.script": "URL: the installer environment (images/installer) fetches and runs this install script",
    "lab.syslog": "HOST:PORT: with lab.script, where the installer's output is forwarded (syslog over UDP)",
}


class DiscoveryBuildError(RuntimeError):
    """The discovery image could not be built; the message says what to do."""


@dataclass(frozen=True)
class DiscoveryImage:
    kernel: Path
    initrd: Path
    manifest: Path
    size_bytes: int
    inputs_hash: str
    kernel_version: str
    cached: bool = False
    modules: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------------
# cache location and inputs


def default_cache_dir() -> Path:
    """``/var/cache/lab-platform/discovery`` for root, else ``$XDG_CACHE_HOME/lab-platform/discovery``."""
    if os.geteuid() == 0:
        return Path("/var/cache/lab-platform/discovery")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lab-platform" / "discovery"


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DiscoveryBuildError(f"`{cmd[0]}` not found: the build needs apt and dpkg (Debian)") from exc
    if proc.returncode != 0:
        raise DiscoveryBuildError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def _apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """The candidate versions' control fields, by package name (one apt-cache call: it is slow)."""
    out = _run(["apt-cache", "show", "--no-all-versions", *packages])
    found: dict[str, dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "Package" in fields and "Version" in fields:
            found.setdefault(fields["Package"], fields)
    for package in packages:
        if package not in found:
            raise DiscoveryBuildError(
                f"apt knows no candidate for {package}: run `apt-get update` (as root) and try again"
            )
    return found


def resolve_packages(kernel_package: str | None = None) -> dict[str, tuple[str, str]]:
    """``{"kernel": (name, version), "busybox": (name, version)}`` for the packages to use.

    ``kernel_package`` pins a concrete ``linux-image-*`` package; by default the dependency of
    ``linux-image-amd64`` that is a ``linux-image-<abi>-amd64`` package (at the version it pins).
    """
    kernel_version = None
    if kernel_package is None:
        found = _apt_show(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
        deps = re.split(r"\s*[,|]\s*", found[KERNEL_META_PACKAGE].get("Depends", ""))
        for dep in deps:
            m = re.fullmatch(r"(linux-image-\S+)(?:\s*\(\s*(=|>=)\s*([^)\s]+)\s*\))?", dep.strip())
            if m:
                kernel_package = m.group(1)
                kernel_version = m.group(3) if m.group(2) == "=" else None
                break
        else:
            raise DiscoveryBuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image-* package: {deps}")
    else:
        found = _apt_show(BUSYBOX_PACKAGE)
    if kernel_version is None:
        kernel_version = _apt_show(kernel_package)[kernel_package]["Version"]
    return {
        "kernel": (kernel_package, kernel_version),
        "busybox": (BUSYBOX_PACKAGE, found[BUSYBOX_PACKAGE]["Version"]),
    }


def _apt_stamp() -> str:
    """Changes whenever apt's view of candidates can change (lists, sources, pinning)."""
    h = hashlib.sha256()
    for pattern in ("/var/lib/apt/lists/*", "/etc/apt/sources.list", "/etc/apt/sources.list.d/*",
                    "/etc/apt/preferences", "/etc/apt/preferences.d/*"):
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_cached(cache: Path, kernel_package: str | None) -> dict[str, tuple[str, str]]:
    """:func:`resolve_packages`, remembered in the cache until apt's lists change (apt-cache is slow)."""
    memo = cache / "resolved.json"
    key = f"{_apt_stamp()}:{kernel_package or ''}"
    try:
        data = json.loads(memo.read_text())
        if data.get("key") == key:
            return {k: (v[0], v[1]) for k, v in data["packages"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    packages = resolve_packages(kernel_package)
    tmp = memo.with_name(f".resolved.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "packages": packages}))
    os.replace(tmp, memo)
    return packages


def host_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads, ELF interpreter included (from ``ldd``)."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        return []  # statically linked
    libs = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def host_tool_files(tools: Iterable[str]) -> dict[str, Path]:
    """Archive path -> host file: each tool of this host's PATH as ``opt/lab/bin/<name>`` and every
    library it loads at its own path. Raises :class:`DiscoveryBuildError` naming missing tools."""
    files: dict[str, Path] = {}
    missing = []
    for name in tools:
        found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found is None:
            missing.append(name)
            continue
        path = Path(found).resolve()
        files[f"opt/lab/bin/{name}"] = path
        for lib in host_libraries(path):
            files[str(lib).lstrip("/")] = lib
    if missing:
        raise DiscoveryBuildError(f"tools missing on this host: {', '.join(missing)} "
                                  "(make deps-system installs them: scripts/apt-packages.txt)")
    return files


def _source_files() -> list[Path]:
    files = sorted(p for p in SOURCE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    if not (SOURCE_DIR / "init").is_file():
        raise DiscoveryBuildError(f"{SOURCE_DIR}/init is missing: the package is incomplete")
    return files


def inputs_hash(packages: dict[str, tuple[str, str]], modules: Iterable[str] = MODULES,
                tools: dict[str, Path] | None = None) -> str:
    """A short hash of everything that goes into the image (``tools``: :func:`host_tool_files`
    of :data:`HOST_TOOLS` by default; their contents count, so a host package update makes a new image)."""
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\n".encode())
    for name, path in sorted((host_tool_files(HOST_TOOLS) if tools is None else tools).items()):
        h.update(f"tool={name}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for key in sorted(packages):
        name, version = packages[key]
        h.update(f"{key}={name}={version}\n".encode())
    h.update(("modules=" + ",".join(sorted(_norm(m) for m in modules)) + "\n").encode())
    for path in _source_files():
        data = path.read_bytes()
        h.update(f"file={path.relative_to(SOURCE_DIR).as_posix()}:{len(data)}:{oct(path.stat().st_mode & 0o111)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# kernel modules: names, .modinfo, dependency resolution


def _norm(name: str) -> str:
    return name.strip().replace("-", "_")


def _module_name(path: str | Path) -> str:
    base = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return _norm(base)


def _module_bytes(path: Path) -> bytes:
    """The uncompressed ELF of a module file (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
        return proc.stdout
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section, as lists per key."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise DiscoveryBuildError("not a little-endian ELF64 kernel module")
    e_shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        off = e_shoff + index * e_shentsize
        name, _type = struct.unpack_from("<II", elf, off)
        offset, size = struct.unpack_from("<QQ", elf, off + 24)
        return name, offset, size

    _, str_off, str_size = section(e_shstrndx)
    names = elf[str_off : str_off + str_size]
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        end = names.index(b"\0", name_off)
        if names[name_off:end] != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            if b"=" in entry:
                key, _, value = entry.decode("utf-8", "replace").partition("=")
                info.setdefault(key, []).append(value)
    return info


def _softdeps(values: list[str]) -> tuple[list[str], list[str]]:
    pre: list[str] = []
    post: list[str] = []
    for value in values:
        current = None
        for word in value.split():
            if word == "pre:":
                current = pre
            elif word == "post:":
                current = post
            elif current is not None:
                current.append(_norm(word))
    return pre, post


@dataclass
class ModuleSet:
    """The result of resolving the wanted modules against one kernel's module tree."""

    order: list[str]  # load order: every module after its dependencies
    files: dict[str, Path]  # name -> file in the unpacked package
    builtin: list[str]  # wanted but built into the kernel
    firmware: dict[str, list[str]]  # name -> firmware files it may ask for (not included)
    depends: dict[str, list[str]]  # name -> hard dependencies (for modules.dep)
    wanted: list[str] = field(default_factory=list)  # asked for (not only pulled in as a dependency)
    pre: dict[str, list[str]] = field(default_factory=dict)  # name -> softdep pre modules present
    pci_aliases: dict[str, list[str]] = field(default_factory=dict)  # name -> "pci:..." globs


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> ModuleSet:
    """Resolve ``wanted`` modules and their dependencies in an unpacked ``/lib/modules/<kver>``.

    Hard dependencies come from ``depends=``; ``softdep=`` pre/post modules are added when the
    kernel has them (r8169 wants the realtek PHY driver). Unknown modules raise; built-ins are noted.
    """
    index: dict[str, Path] = {}
    for path in moddir.joinpath("kernel").rglob("*.ko*"):
        index[_module_name(path)] = path
    builtin_file = moddir / "modules.builtin"
    builtin = {_module_name(line) for line in builtin_file.read_text().split()} if builtin_file.exists() else set()

    order: list[str] = []
    files: dict[str, Path] = {}
    depends: dict[str, list[str]] = {}
    firmware: dict[str, list[str]] = {}
    pre_deps: dict[str, list[str]] = {}
    pci_aliases: dict[str, list[str]] = {}
    builtins: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"
    missing: list[str] = []

    def visit(name: str, chain: tuple[str, ...], optional: bool) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise DiscoveryBuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            if name in builtin:
                state[name] = "done"
                if not chain:
                    builtins.append(name)
            elif not optional:
                missing.append(" -> ".join(chain + (name,)))
            return
        state[name] = "visiting"
        info = modinfo(_module_bytes(index[name]))
        hard = [_norm(d) for v in info.get("depends", []) for d in v.split(",") if d.strip()]
        pre, post = _softdeps(info.get("softdep", []))
        for dep in hard:
            visit(dep, chain + (name,), optional=False)
        for dep in pre:
            visit(dep, chain + (name,), optional=True)
        state[name] = "done"
        order.append(name)
        files[name] = index[name]
        depends[name] = hard
        pre_deps[name] = pre
        if info.get("firmware"):
            firmware[name] = sorted(set(info["firmware"]))
        pci = sorted({a for a in info.get("alias", []) if a.startswith("pci:")})
        if pci:
            pci_aliases[name] = pci
        for dep in post:
            visit(dep, chain + (name,), optional=True)

    for name in wanted:
        visit(_norm(name), (), optional=False)
    if missing:
        raise DiscoveryBuildError(f"modules not found in {moddir}: {', '.join(missing)}")
    wanted_present = [n for n in dict.fromkeys(_norm(m) for m in wanted) if n in files]
    return ModuleSet(order=order, files=files, builtin=builtins, firmware=firmware, depends=depends,
                     wanted=wanted_present, pre={n: [d for d in p if d in files] for n, p in pre_deps.items()},
                     pci_aliases=pci_aliases)


def _glob_to_ere(pattern: str) -> str:
    """A modalias glob (``*``, ``?``, ``[...]``) as an anchored POSIX ERE for (busybox) awk."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append("\\[")
            else:
                out.append(pattern[i : end + 1])
                i = end
        elif c.isalnum() or c in ":_-":
            out.append(c)
        else:
            out.append("\\" + c)
        i += 1
    out.append("$")
    return "".join(out)


def module_plan(mods: ModuleSet) -> str:
    """``etc/lab/modules.plan`` for /init: one line per module in load order,
    ``name kind deps``: kind ``pci`` (wanted, loaded when a PCI device matches one of its aliases,
    listed in modules.pci), ``always`` (wanted, no PCI aliases: bus-independent or virtio/USB/SCSI
    class drivers) or ``dep`` (loaded when something that needs it is); deps comma-separated or ``-``."""
    lines = []
    for name in mods.order:
        kind = "dep"
        if name in mods.wanted:
            kind = "pci" if name in mods.pci_aliases else "always"
        deps = [d for d in mods.depends[name] + mods.pre.get(name, []) if d in mods.files]
        lines.append(f"{name} {kind} {','.join(dict.fromkeys(deps)) or '-'}")
    return "\n".join(lines) + "\n"


def module_pci_table(mods: ModuleSet) -> str:
    """``etc/lab/modules.pci``: ``name ERE`` per PCI alias of the wanted PCI drivers."""
    return "".join(f"{name} {_glob_to_ere(a)}\n" for name in mods.order if name in mods.wanted
                   for a in mods.pci_aliases.get(name, []))


# --------------------------------------------------------------------------------------------------
# cpio (newc) writer


class CpioWriter:
    """A minimal newc ("070701") archive writer: what the kernel's initramfs unpacker reads."""

    def __init__(self, fh: io.BufferedIOBase, mtime: int = 0):
        self._fh = fh
        self._ino = 1
        self._mtime = mtime
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._seen:
            raise ValueError(f"duplicate cpio entry {name}")
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, self._mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._ino += 1
        self._fh.write(header + encoded)
        self._fh.write(b"\0" * (-(110 + len(encoded)) % 4))
        self._fh.write(data)
        self._fh.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# --------------------------------------------------------------------------------------------------
# the build


def _download(name: str, version: str, debs: Path, progress: Callable[[str], object]) -> Path:
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{name}_{quoted}_*.deb"))
    if found:
        return found[0]
    progress(f"discovery: apt-get download {name}={version}")
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        cmd = ["apt-get", "download", "-q", f"{name}={version}"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(cmd, cwd=Path(tmp))
        got = sorted(Path(tmp).glob(f"{name}_*.deb"))
        if not got:
            raise DiscoveryBuildError(f"apt-get download {name}={version} produced no .deb")
        target = debs / got[0].name
        os.replace(got[0], target)
    return target


def _extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def _build_into(work: Path, packages: dict[str, tuple[str, str]], modules: tuple[str, ...],
                debs: Path, digest: str, progress: Callable[[str], object]) -> dict:
    kname, kversion = packages["kernel"]
    bname, bversion = packages["busybox"]
    kdeb = _download(kname, kversion, debs, progress)
    bdeb = _download(bname, bversion, debs, progress)

    with tempfile.TemporaryDirectory(dir=work.parent, prefix=".unpack-") as scratch_s:
        scratch = Path(scratch_s)
        progress(f"discovery: unpacking {kdeb.name}")
        _extract(kdeb, scratch / "kernel")
        _extract(bdeb, scratch / "busybox")

        vmlinuz = sorted((scratch / "kernel" / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise DiscoveryBuildError(f"{kdeb.name} has no boot/vmlinuz-*")
        kver = vmlinuz[0].name[len("vmlinuz-"):]
        moddir = None
        for base in ("lib/modules", "usr/lib/modules"):
            candidate = scratch / "kernel" / base / kver
            if candidate.is_dir():
                moddir = candidate
                break
        if moddir is None:
            raise DiscoveryBuildError(f"{kdeb.name} has no lib/modules/{kver}")
        busybox = scratch / "busybox" / "bin" / "busybox"
        if not busybox.is_file():
            raise DiscoveryBuildError(f"{bdeb.name} has no bin/busybox")

        resolved = resolve_modules(moddir, modules)
        progress(f"discovery: kernel {kver}, {len(resolved.order)} modules "
                 f"({len(modules)} wanted, built in: {', '.join(resolved.builtin) or 'none'})")

        raw = io.BytesIO()
        cpio = CpioWriter(raw)
        base_dirs = ("bin", "dev", "etc", "etc/lab", "lib", "lib/modules", f"lib/modules/{kver}", "proc",
                     "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var", "var/run")
        for d in base_dirs:
            cpio.dir(d, 0o1777 if d == "tmp" else 0o755)
        tools = host_tool_files(HOST_TOOLS)
        for d in sorted({"/".join(n.split("/")[:i]) for n in tools for i in range(1, n.count("/") + 1)}
                        - set(base_dirs)):
            cpio.dir(d)
        for name, path in sorted(tools.items()):
            cpio.file(name, path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        for src in _source_files():
            rel = src.relative_to(SOURCE_DIR).as_posix()
            perm = 0o755 if os.access(src, os.X_OK) or rel == "init" or rel.endswith(".script") else 0o644
            target = "init" if rel == "init" else f"etc/lab/{rel}"
            cpio.file(target, src.read_bytes(), perm)
        dep_lines = []
        module_sizes = {}
        for name in resolved.order:
            data = _module_bytes(resolved.files[name])
            module_sizes[name] = len(data)
            cpio.file(f"lib/modules/{kver}/{name}.ko", data)
            deps = " ".join(f"{d}.ko" for d in resolved.depends[name] if d in resolved.files)
            dep_lines.append(f"{name}.ko: {deps}".rstrip())
        cpio.file(f"lib/modules/{kver}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
        cpio.file("etc/lab/modules.load", ("\n".join(resolved.order) + "\n").encode())
        cpio.file("etc/lab/modules.plan", module_plan(resolved).encode())
        cpio.file("etc/lab/modules.pci", module_pci_table(resolved).encode())
        cpio.file("etc/lab/build.json", json.dumps({
            "inputs_hash": digest, "kernel_version": kver, "kernel_package": f"{kname}={kversion}",
            "busybox_package": f"{bname}={bversion}",
        }, sort_keys=True).encode())
        cpio.close()

        progress(f"discovery: compressing initramfs ({raw.tell() / 1e6:.1f} MB cpio)")
        initrd_bytes = gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)
        (work / "initrd.img").write_bytes(initrd_bytes)
        shutil.copyfile(vmlinuz[0], work / "vmlinuz")

    sizes = {n: (work / n).stat().st_size for n in ("vmlinuz", "initrd.img")}
    return {
        "format": BUILD_FORMAT,
        "inputs_hash": digest,
        "kernel_version": kver,
        "packages": {k: {"name": n, "version": v} for k, (n, v) in packages.items()},
        "files": {
            name: {"size_bytes": sizes[name],
                   "sha256": hashlib.sha256((work / name).read_bytes()).hexdigest()}
            for name in ("vmlinuz", "initrd.img")
        },
        "size_bytes": sum(sizes.values()),
        "initramfs_uncompressed_bytes": raw.tell(),
        "modules": resolved.order,
        "modules_builtin": resolved.builtin,
        "module_firmware_not_included": resolved.firmware,
        "cmdline_args": CMDLINE_ARGS,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically: a hard link when on the same filesystem, else a copy."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _prune(cache: Path, keep: str, packages: dict[str, tuple[str, str]], keep_images: int = 3) -> None:
    """Drop all but the ``keep_images`` newest images (always keeping ``keep``) and unused .debs."""
    images = sorted((p for p in cache.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    others = [p for p in images if p.name != keep]
    for old in others[max(keep_images - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)
    wanted = {f"{name}_{version.replace(':', '%3a')}_" for name, version in packages.values()}
    for deb in (cache / "debs").glob("*.deb"):
        if not any(deb.name.startswith(prefix) for prefix in wanted):
            deb.unlink(missing_ok=True)


def build_discovery(cache_dir: Path | None, out_dir: Path, *, progress: Callable[[str], object] = print,
                    kernel_package: str | None = None, modules: Iterable[str] = MODULES,
                    force: bool = False) -> DiscoveryImage:
    """Build (or take from the cache) the discovery kernel + initramfs and publish it in ``out_dir``.

    ``cache_dir``: where downloaded packages and built images live (``None``: :func:`default_cache_dir`);
    images are at ``<cache_dir>/<inputs hash>/``. ``out_dir`` (the bastion's ``images/discovery``)
    receives ``vmlinuz``, ``initrd.img`` and ``manifest.json``. Raises :class:`DiscoveryBuildError`.
    """
    started = time.monotonic()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = Path(out_dir)
    modules = tuple(modules)
    cache.mkdir(parents=True, exist_ok=True)
    packages = _resolve_cached(cache, kernel_package)
    digest = inputs_hash(packages, modules)
    final = cache / digest
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = (final / "manifest.json").is_file() and not force
        if cached:
            progress(f"discovery: cached image {digest} ({final})")
        else:
            work = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{digest}-"))
            try:
                manifest = _build_into(work, packages, modules, debs, digest, progress)
                manifest["build_seconds"] = round(time.monotonic() - started, 1)
                (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(work, final)
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
        manifest = json.loads((final / "manifest.json").read_text())
        for name in ("vmlinuz", "initrd.img", "manifest.json"):
            publish(final / name, out / name)
        if not cached:
            _prune(cache, digest, packages)

    progress(f"discovery: {out}/vmlinuz + initrd.img, {manifest['size_bytes'] / 1e6:.1f} MB, "
             f"kernel {manifest['kernel_version']}, hash {digest}, {time.monotonic() - started:.1f} s")
    return DiscoveryImage(
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        manifest=out / "manifest.json",
        size_bytes=int(manifest["size_bytes"]),
        inputs_hash=digest,
        kernel_version=manifest["kernel_version"],
        cached=cached,
        modules=tuple(manifest["modules"]),
    )
