"""The installer's routes: the Fedora kickstart (GET /ks), the rescue and discovery kickstarts
(GET /debug.ks, /discover.ks), the rescue shell's nc listener script (GET /debug-setup.sh), the
Ubuntu autoinstall as cloud-init NoCloud (GET /autoinstall/<mac>/<token>/user-data and /meta-data)
and the image deploy's install script (GET /install.sh).

The routes only check the request (MAC, install token, the machine's installer kind) and pick the
machine; :mod:`bastion_app.installers` renders the documents.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from bastion_app import agent_install, get_store
from bastion_app.errors import ApiError
from bastion_app.images.osimage import read_manifest
from bastion_app.images.sync import ImageError, load_manifest
from bastion_app.installers import (
    DEBUG_LISTEN_PORT,
    autoinstall_meta_data,
    autoinstall_user_data,
    debug_kickstart,
    debug_setup_script,
    discovery_kickstart,
    image_install_script,
    kickstart,
)
from bastion_app.routes import base_url, cfg, install_machine, int_arg, mac_arg
from labcore import domain, validate

bp = Blueprint("installer", __name__)


def text_response(text: str, mimetype: str = "text/plain") -> Response:
    return Response(text, mimetype=mimetype, headers={"Cache-Control": "no-store"})


def _install_machine(mac_value: str | None, token_value: str | None, installer: domain.InstallerKind) -> dict:
    mac = mac_arg(mac_value)
    try:
        token = validate.token(token_value or "")
    except validate.ValidationError as exc:
        raise ApiError(400, exc.message, {"field": "token"}) from None
    m = install_machine(mac, token)  # one uniform 403 for unknown MAC, no install, wrong token or address
    if domain.operating_system(validate.os_name(m["os"])).installer != installer:
        raise ApiError(409, f"machine {mac} installs {m['os']}, not with {installer}",
                       {"os": m["os"]})
    return m


def _manifest() -> dict:
    try:
        return load_manifest(cfg().data_path)
    except ImageError as exc:
        raise ApiError(500, "the images manifest is invalid", str(exc)) from None


@bp.get("/ks")
def ks_route():
    m = _install_machine(request.args.get("mac"), request.args.get("token"), "kickstart")
    return text_response(kickstart(m, base=base_url(), syslog_port=cfg().syslog_port, manifest=_manifest(),
                                   agent=agent_install.context(get_store(), m, cfg())))


@bp.get("/install.sh")
def image_install_route():
    m = _install_machine(request.args.get("mac"), request.args.get("token"), "image")
    return text_response(image_install_script(m, base=base_url(), image=read_manifest(cfg().images_path, m["os"]),
                                              kernel_args=cfg().kernel_args,
                                              agent=agent_install.context(get_store(), m, cfg())), "text/x-shellscript")


@bp.get("/autoinstall/<mac>/<token>/user-data")
def autoinstall_user_data_route(mac: str, token: str):
    m = _install_machine(mac, token, "autoinstall")
    return text_response(autoinstall_user_data(m, base=base_url(), manifest=_manifest(),
                                               agent=agent_install.context(get_store(), m, cfg())), "text/cloud-config")


@bp.get("/autoinstall/<mac>/<token>/meta-data")
def autoinstall_meta_data_route(mac: str, token: str):
    m = _install_machine(mac, token, "autoinstall")
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
