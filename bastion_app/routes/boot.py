"""Machine-facing boot scripts: GET /dispatch?mac= picks the iPXE script for a machine."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request

from bastion_app import get_store
from bastion_app.installers import syslog_target
from bastion_app.render import render
from bastion_app.routes import base_url, cfg, mac_arg
from bastion_app.store import StorageUnavailable
from labcore import domain, validate
from labcore.lifecycle import BootMode, boot_mode

bp = Blueprint("boot", __name__)
log = logging.getLogger("bastion_app")


def ipxe_response(text: str) -> Response:
    return Response(text, mimetype="text/plain", headers={"Cache-Control": "no-store"})


def discovery_method() -> str:
    c = cfg()
    if c.discovery == "image" and (c.images_path / "discovery" / "vmlinuz").exists():
        return "image"
    if (c.images_path / domain.RESCUE_OS.name / domain.RESCUE_OS.kernel).exists():
        return "kickstart"
    return "none"


def _best_effort(write, *args, **kwargs):
    """A bookkeeping write that must not stop a machine from booting when the data directory is
    full or read-only: the boot script is served anyway, the failure is logged."""
    try:
        return write(*args, **kwargs)
    except StorageUnavailable as exc:
        log.warning("dispatch: %s (serving the boot script anyway)", exc)
        return None


@bp.get("/dispatch")
def dispatch():
    mac = mac_arg(request.args.get("mac"))
    store = get_store()
    ip = request.remote_addr
    machine = store.get(mac)
    # a debug boot that cannot be cleared (storage unavailable) is not served: one-shot stays one-shot
    debug = _best_effort(store.take_debug, mac) if machine and machine["debug_mode"] else None
    mode = boot_mode(machine["state"] if machine else None, debug)
    base = base_url()
    if mode == BootMode.INSTALL:
        machine = _best_effort(store.start_install, mac, ip=ip) or machine
        text = render("ipxe/install.ipxe.j2", base=base, mac=mac, token=machine["install_token"],
                      os=machine["os"], role=machine["role"], hostname=machine["hostname"],
                      installer=domain.operating_system(validate.os_name(machine["os"])).installer,
                      syslog=syslog_target(base, cfg().syslog_port), kernel_args=cfg().kernel_args)
    elif mode == BootMode.LOCAL:
        _best_effort(store.seen, mac, ip)
        efi = cfg().images_path / "local-boot" / "grubx64.efi"
        text = render("ipxe/local-boot.ipxe.j2", base=base, mac=mac, hostname=machine["hostname"],
                      efi_chain=f"{base}/images/local-boot/grubx64.efi" if efi.exists() else "")
    elif mode == BootMode.DEBUG:
        text = render("ipxe/debug.ipxe.j2", base=base, mac=mac, installer_os=domain.RESCUE_OS.name)
    elif mode == BootMode.PXE_DEBUG:
        text = render("ipxe/pxe-debug.ipxe.j2", base=base, mac=mac)
    else:
        if machine:
            _best_effort(store.seen, mac, ip)
        text = render("ipxe/discover.ipxe.j2", base=base, mac=mac, method=discovery_method(),
                      action=cfg().discovery_action, installer_os=domain.RESCUE_OS.name,
                      kernel_args=cfg().kernel_args)
    return ipxe_response(text)
