"""Boot artefacts: what each OS's installer needs, where it comes from, and `lab-bastion images
sync`, which downloads it into <data>/images/<os>/.

The manifest is built in (below) and can be changed per bastion with <data>/images.yaml, which
has the same shape; an OS given there replaces the built-in entry's keys it names::

    fedora-43:
      files:
        vmlinuz: {url: "https://mirror.example/.../images/pxeboot/vmlinuz", sha256: "ab12..."}
      repos:
        - {name: fedora, url: "https://mirror.example/fedora/releases/43/Everything/x86_64/os/"}

A file's checksum is `sha256` (hex) or `sha256sums` (URL of a SHA256SUMS/CHECKSUM file that lists
the file by name). Downloads resume (HTTP Range), go to `<name>.part`, are checked, and only then
renamed into place: a file under its final name is always complete and verified.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from labcore.yamlfile import YamlFileError, read_mapping

MANIFEST_NAME = "images.yaml"

_FEDORA = "https://dl.fedoraproject.org/pub/fedora/linux/releases/43/Everything/x86_64/os"
_FEDORA_MIRRORLIST = "https://mirrors.fedoraproject.org/mirrorlist?repo={repo}&arch=x86_64"
_UBUNTU = "https://releases.ubuntu.com/26.04"

DEFAULT_MANIFEST: dict[str, dict[str, Any]] = {
    "fedora-43": {
        "files": {
            "vmlinuz": {"url": f"{_FEDORA}/images/pxeboot/vmlinuz"},
            "initrd.img": {"url": f"{_FEDORA}/images/pxeboot/initrd.img"},
            # inst.stage2=<bastion>/images/fedora-43/tree: dracut's anaconda module reads [stage2]
            # mainimage from tree/.treeinfo when there is one, else it takes images/install.img
            "tree/.treeinfo": {"url": f"{_FEDORA}/.treeinfo"},
            "tree/images/install.img": {"url": f"{_FEDORA}/images/install.img"},
        },
        # package repositories the kickstart installs from (the first is the base `url`)
        "repos": [
            {"name": "fedora", "mirrorlist": _FEDORA_MIRRORLIST.format(repo="fedora-43")},
            {"name": "updates", "mirrorlist": _FEDORA_MIRRORLIST.format(repo="updates-released-f43")},
        ],
    },
    "ubuntu-26.04": {
        "files": {
            "vmlinuz": {"url": f"{_UBUNTU}/netboot/amd64/linux", "sha256sums": f"{_UBUNTU}/netboot/SHA256SUMS"},
            "initrd": {"url": f"{_UBUNTU}/netboot/amd64/initrd", "sha256sums": f"{_UBUNTU}/netboot/SHA256SUMS"},
            "installer.iso": {"url": f"{_UBUNTU}/ubuntu-26.04-live-server-amd64.iso",
                              "sha256sums": f"{_UBUNTU}/SHA256SUMS"},
        },
        # the Ubuntu archive the autoinstall points apt at
        "mirror": "http://archive.ubuntu.com/ubuntu",
    },
}

_URL = re.compile(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/%+,=&?:-]*)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9._-]{1,64}){0,4}")
_OS = re.compile(r"[a-z0-9][a-z0-9.-]{0,31}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ImageError(Exception):
    """A download or manifest problem; the message says what to do."""


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _URL.fullmatch(value):
        raise ImageError(f"{where}: {value!r} is not an http(s) URL without spaces or quotes")
    return value


def validate_manifest(doc: Any, source: str = MANIFEST_NAME) -> dict[str, dict[str, Any]]:
    """Check every OS entry; values reach kickstarts and autoinstall documents."""
    if not isinstance(doc, dict):
        raise ImageError(f"{source}: expected a mapping of OS name -> entry")
    for os_name, entry in doc.items():
        where = f"{source}: {os_name}"
        if not isinstance(os_name, str) or not _OS.fullmatch(os_name):
            raise ImageError(f"{source}: {os_name!r} is not an OS name (e.g. fedora-43)")
        if not isinstance(entry, dict):
            raise ImageError(f"{where}: expected a mapping with files (and repos or mirror)")
        unknown = set(entry) - {"files", "repos", "mirror"}
        if unknown:
            raise ImageError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        files = entry.get("files", {})
        if not isinstance(files, dict):
            raise ImageError(f"{where}: files must map a file name to {{url, sha256 | sha256sums}}")
        for name, spec in files.items():
            fw = f"{where}: files: {name}"
            if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name.split("/"):
                raise ImageError(f"{fw}: not a safe relative file name")
            if not isinstance(spec, dict) or set(spec) - {"url", "sha256", "sha256sums"}:
                raise ImageError(f"{fw}: expected {{url, sha256 | sha256sums}}")
            _url(spec.get("url"), fw + ": url")
            if spec.get("sha256") and not _HEX64.fullmatch(str(spec["sha256"]).lower()):
                raise ImageError(f"{fw}: sha256 must be 64 hex digits")
            if spec.get("sha256sums"):
                _url(spec["sha256sums"], fw + ": sha256sums")
        for i, repo in enumerate(entry.get("repos", []) or []):
            rw = f"{where}: repos[{i}]"
            if not isinstance(repo, dict) or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", str(repo.get("name", ""))):
                raise ImageError(f"{rw}: needs a name of letters, digits, '-' or '_'")
            if bool(repo.get("url")) == bool(repo.get("mirrorlist")) or set(repo) - {"name", "url", "mirrorlist"}:
                raise ImageError(f"{rw}: give exactly one of url or mirrorlist")
            _url(repo.get("url") or repo.get("mirrorlist"), rw)
        if "mirror" in entry:
            _url(entry["mirror"], where + ": mirror")
    return doc


def load_manifest(data_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The built-in manifest with <data>/images.yaml applied on top."""
    manifest = copy.deepcopy(DEFAULT_MANIFEST)
    path = Path(data_dir) / MANIFEST_NAME
    try:
        doc = read_mapping(path, "OS name -> entry")
    except YamlFileError as exc:
        raise ImageError(str(exc)) from None
    validate_manifest(doc, str(path))
    for os_name, entry in doc.items():
        manifest.setdefault(os_name, {}).update(entry)
    return validate_manifest(manifest, "manifest")


# -- downloading -------------------------------------------------------------------------------
CHUNK = 1024 * 1024
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *]?(\S.*)$")  # sha256sum: HEX  NAME / HEX *NAME
_BSD_LINE = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")  # Fedora CHECKSUM: SHA256 (NAME) = HEX

#: progress(label, done_bytes, total_bytes or None)
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class Synced:
    label: str  # <os>/<name>
    path: Path
    sha256: str
    action: str  # downloaded | resumed | up to date | kept (no checksum)
    verified: bool  # against a configured checksum


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(spec: dict, session: requests.Session, timeout: float, cache: dict[str, str]) -> str | None:
    """The configured checksum of a file: `sha256`, or its line in the `sha256sums` file."""
    if spec.get("sha256"):
        return str(spec["sha256"]).lower()
    sums_url = spec.get("sha256sums")
    if not sums_url:
        return None
    if sums_url not in cache:
        try:
            r = session.get(sums_url, timeout=timeout)
            r.raise_for_status()
        except requests.RequestException as exc:
            raise ImageError(f"cannot fetch the checksum list {sums_url}: {exc}") from None
        cache[sums_url] = r.text
    table: dict[str, str] = {}
    for line in cache[sums_url].splitlines():
        line = line.strip()
        if m := _SUMS_LINE.match(line):
            table[m.group(2).lstrip("./")] = m.group(1).lower()
        elif m := _BSD_LINE.match(line):
            table[m.group(1).lstrip("./")] = m.group(2).lower()
    rel = spec["url"][len(sums_url.rsplit("/", 1)[0]) + 1:] if spec["url"].startswith(sums_url.rsplit("/", 1)[0] + "/") else ""
    base = spec["url"].rsplit("/", 1)[-1]
    for key in (rel, base):
        if key and key in table:
            return table[key]
    candidates = [v for k, v in table.items() if k.rsplit("/", 1)[-1] == base]
    if len(candidates) == 1:
        return candidates[0]
    raise ImageError(f"{sums_url} does not list {rel or base}: fix sha256sums (or give sha256) in {MANIFEST_NAME}")


def download(url: str, dest: Path, *, expected: str | None, session: requests.Session, label: str,
             progress: Progress | None = None, timeout: float = 60.0) -> tuple[str, str]:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed if present), verify, rename.
    Returns (sha256, "downloaded" | "resumed"). On a checksum mismatch the partial file is
    removed and ``dest`` is left as it was."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        r = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise ImageError(f"{label}: cannot download {url}: {exc}") from None
    with r:
        if have and r.status_code == 416:  # the part is already whole
            r.close()
            total, mode = have, None
        elif r.status_code == 206 and have:
            mode, total = "ab", _total(r, have)
        elif r.status_code == 200:
            have, mode, total = 0, "wb", _total(r, 0)
        else:
            raise ImageError(f"{label}: {url} answered HTTP {r.status_code}")
        h = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        done = have
        if mode:
            try:
                with open(part, mode) as f:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(label, done, total)
                    f.flush()
                    os.fsync(f.fileno())
            except (requests.RequestException, OSError) as exc:
                raise ImageError(f"{label}: download of {url} interrupted at {done} bytes ({exc}); "
                                 "run images sync again to resume") from None
        if total is not None and done != total:
            raise ImageError(f"{label}: download of {url} stopped at {done} of {total} bytes; "
                             "run images sync again to resume")
    digest = h.hexdigest()
    if expected and digest != expected:
        part.unlink(missing_ok=True)
        raise ImageError(f"{label}: checksum mismatch for {url}: expected sha256 {expected}, got {digest}. "
                         f"The download was discarded and {dest.name} left as it was; check the url and "
                         f"checksum in {MANIFEST_NAME}")
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return digest, ("resumed" if headers else "downloaded")


def _total(r: requests.Response, offset: int) -> int | None:
    length = r.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync(data_dir: str | os.PathLike, oses: list[str] | None = None, *, force: bool = False,
         progress: Progress | None = None, session: requests.Session | None = None,
         timeout: float = 60.0) -> list[Synced]:
    """Bring <data>/images/<os>/ up to date with the manifest. A file already there is kept when
    it matches its checksum (or, with no checksum configured, unless ``force``)."""
    manifest = load_manifest(data_dir)
    wanted = oses or sorted(manifest)
    unknown = [o for o in wanted if o not in manifest]
    if unknown:
        raise ImageError(f"unknown OS {', '.join(unknown)} (known: {', '.join(sorted(manifest))})")
    session = session or requests.Session()
    sums_cache: dict[str, str] = {}
    root = Path(data_dir) / "images"
    out: list[Synced] = []
    for os_name in wanted:
        for name, spec in manifest[os_name].get("files", {}).items():
            label = f"{os_name}/{name}"
            dest = root / os_name / name
            expected = expected_sha256(spec, session, timeout, sums_cache)
            if dest.exists() and not force:
                if expected is None:
                    out.append(Synced(label, dest, _sha256_file(dest), "kept (no checksum)", False))
                    continue
                current = _sha256_file(dest)
                if current == expected:
                    out.append(Synced(label, dest, current, "up to date", True))
                    continue
            digest, action = download(spec["url"], dest, expected=expected, session=session, label=label,
                                      progress=progress, timeout=timeout)
            out.append(Synced(label, dest, digest, action, expected is not None))
    return out
