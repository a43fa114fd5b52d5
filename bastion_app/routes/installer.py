"""What a machine receives while it installs: the Fedora kickstart (GET /ks), the rescue and
discovery kickstarts (GET /debug.ks, /discover.ks), the rescue shell's nc listener script
(GET /debug-setup.sh) and the Ubuntu autoinstall as cloud-init NoCloud
(GET /autoinstall/<mac>/<token>/user-data and /meta-data).

The functions ``kickstart``, ``user_data`` ... render documents from a machine record and know
nothing about HTTP; the routes only check the request (MAC, install token) and pick the machine.
Every value is validated again here (labcore.validate) before it reaches a template, and the
template callables refuse what could add a line (``ks``) or emit properly escaped YAML/JSON.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Response, request

from bastion_app import get_store
from bastion_app.errors import ApiError
from bastion_app.images.sync import ImageError, load_manifest
from bastion_app.render import UnsafeValue, render
from bastion_app.routes import base_url, cfg, int_arg, mac_arg
from labcore import validate

bp = Blueprint("installer", __name__)

DISCOVERY_LIB = Path(__file__).resolve().parent.parent / "images" / "discovery" / "lib.sh"
DEBUG_LISTEN_PORT = 4444


# -- the disk layout (seed: "Disk Layout"), one table for Fedora and Ubuntu ----------------------
@dataclass(frozen=True)
class Volume:
    mount: str
    name: str  # logical volume name in labvg
    size_mib: int | None  # None = the rest of the volume group
    fstype: str
    preserve: bool  # kept on reprovision
    roles: tuple[str, ...] = ()  # () = every role


GIB = 1024
EFI_MIB = 600
BOOT_MIB = 3 * GIB
TMP_SIZE = "4G"
LAYOUT = (
    Volume("swap", "swap", 27 * GIB, "swap", False),
    Volume("/", "root", 33 * GIB, "xfs", False),
    Volume("/var", "var", 100 * GIB, "xfs", False),
    Volume("/var/log", "varlog", 10 * GIB, "xfs", False),
    Volume("/home", "home", 10 * GIB, "xfs", True),
    Volume("/srv", "srv", 20 * GIB, "xfs", True),
    Volume("/var/lib/longhorn", "longhorn", None, "xfs", True, ("worker",)),
    Volume("/var/lib/rancher", "rancher", 20 * GIB, "xfs", True, ("infra", "labcontroller")),
)
K3S_ROLES = ("worker", "infra", "labcontroller")


def volumes_for(role: str) -> list[Volume]:
    return [v for v in LAYOUT if not v.roles or role in v.roles]


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


def _host(base: str) -> str:
    try:
        host = urlsplit(base).hostname or ""
    except ValueError:
        host = ""
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host):
        raise UnsafeValue(f"bastion host {host!r} cannot be used as a syslog host")
    return host


def kickstart(m: dict, *, base: str, syslog_port: int, manifest: dict) -> str:
    """The Fedora 43 kickstart for machine record ``m`` (both fresh and reprovision paths)."""
    v = _machine_values(m)
    repos = manifest.get(v["os"], {}).get("repos") or []
    if not repos:
        raise ImageError(f"no package repositories for {v['os']} in the images manifest")
    return render(
        "kickstart/install.ks.j2", ks=ks, **v, base=base, syslog_host=_host(base), syslog_port=int(syslog_port),
        repos=repos, k3s=v["role"] in K3S_ROLES, volumes=volumes_for(v["role"]),
        efi_mib=EFI_MIB, boot_mib=BOOT_MIB, tmp_size=TMP_SIZE,
    )


UBUNTU_PACKAGES = ("chrony", "curl", "efibootmgr", "lvm2", "xfsprogs")
UBUNTU_K3S_PACKAGES = ("conntrack", "iptables")


def autoinstall_user_data(m: dict, *, base: str, manifest: dict) -> str:
    """The Ubuntu autoinstall (cloud-init NoCloud user-data) for machine record ``m``."""
    v = _machine_values(m)
    mirror = manifest.get(v["os"], {}).get("mirror")
    if not mirror:
        raise ImageError(f"no Ubuntu archive mirror for {v['os']} in the images manifest")
    k3s = v["role"] in K3S_ROLES
    ctx = dict(ks=ks, **v, base=base, k3s=k3s, tmp_size=TMP_SIZE, volumes=volumes_for(v["role"]))
    return render(
        "autoinstall/user-data.j2", **ctx, mirror=mirror,
        efi_mib=EFI_MIB, boot_mib=BOOT_MIB,
        packages=UBUNTU_PACKAGES + (UBUNTU_K3S_PACKAGES if k3s else ()),
        events_url=f"{base}/api/installer-events/{v['mac']}/{v['token']}",
        early=render("autoinstall/early.sh.j2", **ctx),
        late=render("autoinstall/late.sh.j2", **ctx),
        error=render("autoinstall/error.sh.j2", **ctx),
    )


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


# -- routes ----------------------------------------------------------------------------------
def text_response(text: str, mimetype: str = "text/plain") -> Response:
    return Response(text, mimetype=mimetype, headers={"Cache-Control": "no-store"})


def _install_machine(mac_value: str | None, token_value: str | None, os_prefix: str) -> dict:
    mac = mac_arg(mac_value)
    try:
        token = validate.token(token_value or "")
    except validate.ValidationError as exc:
        raise ApiError(400, exc.message, {"field": "token"}) from None
    store = get_store()
    m = store.get(mac)
    store.check_install_token(m, token)  # 404 unknown, 409 no install, 403 wrong token
    if not str(m["os"]).startswith(os_prefix):
        raise ApiError(409, f"machine {mac} installs {m['os']}, not {os_prefix}",
                       {"os": m["os"]})
    return m


def _manifest() -> dict:
    try:
        return load_manifest(cfg().data_path)
    except ImageError as exc:
        raise ApiError(500, "the images manifest is invalid", str(exc)) from None


@bp.get("/ks")
def ks_route():
    m = _install_machine(request.args.get("mac"), request.args.get("token"), "fedora")
    return text_response(kickstart(m, base=base_url(), syslog_port=cfg().syslog_port, manifest=_manifest()))


@bp.get("/autoinstall/<mac>/<token>/user-data")
def autoinstall_user_data_route(mac: str, token: str):
    m = _install_machine(mac, token, "ubuntu")
    return text_response(autoinstall_user_data(m, base=base_url(), manifest=_manifest()), "text/cloud-config")


@bp.get("/autoinstall/<mac>/<token>/meta-data")
def autoinstall_meta_data_route(mac: str, token: str):
    m = _install_machine(mac, token, "ubuntu")
    return text_response(autoinstall_meta_data(m))


@bp.get("/debug.ks")
def debug_ks():
    keys: list[str] = []
    if "mac" in request.args:  # optional, but when given it must be a MAC
        m = get_store().get(mac_arg(request.args.get("mac")))
        keys = list(m["ssh_keys"]) if m else []
    return text_response(debug_kickstart(base=base_url(), ssh_keys=keys))


@bp.get("/debug-setup.sh")
def debug_setup():
    port = int_arg("port", DEBUG_LISTEN_PORT, 1024, 65535)
    return text_response(debug_setup_script(base=base_url(), port=port), "text/x-shellscript")


@bp.get("/discover.ks")
def discover_ks():
    return text_response(discovery_kickstart(base=base_url(), action=cfg().discovery_action))
