"""What a machine receives while it installs, rendered from a machine record: the Fedora kickstart,
the rescue and discovery kickstarts, the rescue shell's nc listener script, the Ubuntu
autoinstall (cloud-init NoCloud user-data and meta-data) and the image deploy's install script.

These functions know nothing about HTTP (the routes are in :mod:`bastion_app.routes.installer`).
Every value is validated again here (labcore.validate) before it reaches a template, and the
template callables refuse what could add a line (``ks``) or emit properly escaped YAML/JSON. The
disk layout is :mod:`labcore.layout`; what a role installs follows the role table
(:mod:`labcore.domain`).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from bastion_app.images.sync import ImageError
from bastion_app.render import UnsafeValue, render
from labcore import bastion_config, bastion_files, domain, validate
from labcore.layout import (
    BOOT_MIB,
    EFI_MIB,
    TMP_SIZE,
    disk_mib_needed,
    lv_alloc_mib,
    min_disk_mib,
    volumes_for,
)

DISCOVERY_LIB = Path(__file__).resolve().parent / "images" / "discovery" / "lib.sh"
DEBUG_LISTEN_PORT = 4444


# -- values into documents -------------------------------------------------------------------
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def ks(value) -> str:
    """One kickstart/shell word: printable ASCII only (no newline can end the line or start a
    `%` section), then shell-quoted."""
    s = "" if value is None else str(value)
    if not _PRINTABLE.fullmatch(s):
        raise UnsafeValue(f"refusing to put {s!r} into a kickstart")
    return shlex.quote(s)


def _machine_values(m: dict) -> dict:
    """The machine's install parameters, validated again (the store may predate a rule)."""
    return {
        "mac": validate.mac(m["mac"]),
        "hostname": validate.hostname(m["hostname"]),
        "role": validate.role(m["role"]),
        "os": validate.os_name(m["os"]),
        "disk": validate.disk(m.get("disk") or ""),
        "ssh_keys": validate.ssh_keys(list(m.get("ssh_keys") or [])),
        "token": validate.token(m["install_token"]),
    }


def _other_efi_dirs(os_name: str) -> list[str]:
    """The ESP folders a reinstall with ``os_name`` removes: every other system's."""
    own = domain.operating_system(os_name).efi_dir
    return [d for d in domain.EFI_LOADER_DIRS if d != own]


def _host(base: str) -> str:
    try:
        host = urlsplit(base).hostname or ""
    except ValueError:
        host = ""
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host):
        raise UnsafeValue(f"bastion host {host!r} cannot be used as a syslog host")
    return host


def layout_context(role: str) -> dict:
    """The disk layout's numbers for a template (labcore.layout): the volumes, partition sizes,
    and the space checks' figures that ``scripts/_install-disk.sh.j2`` compares with the disk."""
    return dict(volumes=volumes_for(role), efi_mib=EFI_MIB, boot_mib=BOOT_MIB, tmp_size=TMP_SIZE,
                disk_mib=disk_mib_needed(role), lv_alloc=lv_alloc_mib)


def syslog_target(base: str, port: int) -> str:
    """``host:port`` of the bastion's syslog listener, for Anaconda's ``inst.syslog=`` (an IPv6
    address in brackets)."""
    host = _host(base)
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def kickstart(m: dict, *, base: str, syslog_port: int, manifest: dict, agent: dict | None = None) -> str:
    """The Fedora 43 kickstart for machine record ``m`` (both fresh and reprovision paths);
    ``agent``: lab-agent's part of %post (bastion_app.agent_install.context), None for none."""
    v = _machine_values(m)
    repos = manifest.get(v["os"], {}).get("repos") or []
    if not repos:
        raise ImageError(f"no package repositories for {v['os']} in the images manifest")
    return render(
        "kickstart/install.ks.j2", ks=ks, **v, base=base, syslog_host=_host(base), syslog_port=int(syslog_port),
        repos=repos, k3s=v["role"] in domain.K3S_ROLES, **layout_context(v["role"]),
        other_efi_dirs=_other_efi_dirs(v["os"]), agent=agent,
    )


UBUNTU_PACKAGES = ("chrony", "curl", "efibootmgr", "lvm2", "xfsprogs")
UBUNTU_K3S_PACKAGES = ("conntrack", "iptables")


def autoinstall_user_data(m: dict, *, base: str, manifest: dict, agent: dict | None = None) -> str:
    """The Ubuntu autoinstall (cloud-init NoCloud user-data) for machine record ``m``."""
    v = _machine_values(m)
    mirror = manifest.get(v["os"], {}).get("mirror")
    if not mirror:
        raise ImageError(f"no Ubuntu archive mirror for {v['os']} in the images manifest")
    k3s = v["role"] in domain.K3S_ROLES
    ctx = dict(ks=ks, **v, base=base, k3s=k3s, **layout_context(v["role"]), other_efi_dirs=_other_efi_dirs(v["os"]),
               agent=agent)
    return render(
        "autoinstall/user-data.j2", **ctx, mirror=mirror,
        packages=UBUNTU_PACKAGES + (UBUNTU_K3S_PACKAGES if k3s else ()),
        events_url=f"{base}/api/installer-events/{v['mac']}/{v['token']}",
        early=render("autoinstall/early.sh.j2", **ctx),
        late=render("autoinstall/late.sh.j2", **ctx),
        error=render("autoinstall/error.sh.j2", **ctx),
    )


def image_install_script(m: dict, *, base: str, image: dict | None, kernel_args: str = "",
                         agent: dict | None = None) -> str:
    """The image deploy's install script for machine record ``m`` (run by the installer
    environment). ``image`` is the OS image's manifest (``images/<os>/rootfs.json``); without one
    the script reports at once that the bastion has no image (nothing is written to the disk)."""
    v = _machine_values(m)
    o = domain.operating_system(v["os"])
    image = image or {}
    sha = str(image.get("sha256") or "")
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ImageError(f"the {v['os']} image manifest has an invalid sha256")
    try:
        kernel_args = bastion_config.valid_kernel_args(kernel_args)
    except ValueError:
        raise UnsafeValue(f"kernel arguments {kernel_args!r}") from None
    ctx = layout_context(v["role"])
    # the image deploy scales the layout down on small disks (labcore.layout.scaled_sizes)
    ctx["disk_mib"] = min_disk_mib(v["role"])
    return render("image/install.sh.j2", ks=ks, **v, base=base, k3s=v["role"] in domain.K3S_ROLES, **ctx,
                  other_efi_dirs=_other_efi_dirs(v["os"]), efi_dir=o.efi_dir,
                  image_url=f"{base}/images/{v['os']}/{bastion_files.ROOTFS}", image_sha256=sha,
                  image_bytes=int(image.get("size_bytes") or 0), kernel_args=kernel_args, agent=agent)


def autoinstall_meta_data(m: dict) -> str:
    v = _machine_values(m)
    # a new instance id per install, so cloud-init treats a reinstall as a new instance
    digest = hashlib.sha256(v["token"].encode()).hexdigest()[:12]
    return render("autoinstall/meta-data.j2", hostname=v["hostname"],
                  instance_id=f"lab-{v['mac'].replace(':', '')}-{digest}")


def debug_kickstart(*, base: str, ssh_keys: list[str]) -> str:
    return render("kickstart/debug.ks.j2", ks=ks, base=base, ssh_keys=validate.ssh_keys(ssh_keys),
                  listen_port=DEBUG_LISTEN_PORT)


def debug_setup_script(*, base: str, port: int) -> str:
    return render("scripts/debug-setup.sh.j2", ks=ks, base=base, bastion_host=_host(base), port=int(port))


def discovery_kickstart(*, base: str, action: str) -> str:
    if action not in ("poweroff", "reboot"):
        raise UnsafeValue(f"discovery action {action!r}")
    lib = DISCOVERY_LIB.read_text()
    if any(line.lstrip().startswith("%") for line in lib.splitlines()):
        raise UnsafeValue(f"{DISCOVERY_LIB} has a line starting with '%': it would end the kickstart section")
    return render("kickstart/discover.ks.j2", ks=ks, base=base, action=action, inventory_lib=lib)
