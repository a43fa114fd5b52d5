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
import os
import re
from pathlib import Path
from typing import Any

import yaml

MANIFEST_NAME = "images.yaml"

_FEDORA = "https://dl.fedoraproject.org/pub/fedora/linux/releases/43/Everything/x86_64/os"
_FEDORA_MIRRORLIST = "https://mirrors.fedoraproject.org/mirrorlist?repo={repo}&arch=x86_64"
_UBUNTU = "https://releases.ubuntu.com/26.04"

DEFAULT_MANIFEST: dict[str, dict[str, Any]] = {
    "fedora-43": {
        "files": {
            "vmlinuz": {"url": f"{_FEDORA}/images/pxeboot/vmlinuz"},
            "initrd.img": {"url": f"{_FEDORA}/images/pxeboot/initrd.img"},
            # inst.stage2=<bastion>/images/fedora-43/tree finds images/install.img through .treeinfo
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
    if path.exists():
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ImageError(f"{path}: not valid YAML: {exc}") from None
        validate_manifest(doc, str(path))
        for os_name, entry in doc.items():
            manifest.setdefault(os_name, {}).update(entry)
    return validate_manifest(manifest, "manifest")
