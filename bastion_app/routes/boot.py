"""Machine-facing boot scripts: GET /dispatch?mac= picks the iPXE script for a machine."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request

from bastion_app import binding, get_store
from bastion_app.installers import syslog_target
from bastion_app.render import render
from bastion_app.routes import base_url, cfg, mac_arg
from bastion_app.store import StorageUnavailable, StoreError
from labcore import domain, validate
from labcore.lifecycle import INSTALL_TOKEN_STATES, BootMode, IllegalTransition, State, boot_mode

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


def _script(mac: str, ip: str | None) -> str:
    """The boot script for ``mac`` asked from ``ip``. An install script (with its token) and a
    one-shot debug boot go only to an address that speaks for the machine (bastion_app.binding);
    another address gets the wait script. Raises the store's errors when the machine changes
    meanwhile (cancel, forget): the caller asks again."""
    store = get_store()
    machine = store.get(mac)
    base = base_url()
    speaks, verdict, how = False, binding.Claim.UNKNOWN, ""
    if machine is not None:
        verdict, how = binding.claim(binding.leases_path(cfg()), mac, ip)
        installing = State(machine["state"]) in INSTALL_TOKEN_STATES
        speaks = binding.accepts(verdict, machine["install_ip"] if installing else machine["ip"], ip)
    # a debug boot that cannot be cleared (storage unavailable) is not served: one-shot stays one-shot
    debug = _best_effort(store.take_debug, mac) if speaks and machine["debug_mode"] else None
    mode = boot_mode(machine["state"] if machine else None, debug)
    if mode == BootMode.INSTALL:
        if not speaks:
            log.warning("dispatch: %s asked for the install script of %s, which is bound to another address (%s)",
                        ip, mac, how)
            return render("ipxe/wait.ipxe.j2", base=base, mac=mac)
        machine = _best_effort(store.start_install, mac, ip=ip, verdict=verdict) or machine
        return render("ipxe/install.ipxe.j2", base=base, mac=mac, token=machine["install_token"],
                      os=machine["os"], role=machine["role"], hostname=machine["hostname"],
                      installer=domain.operating_system(validate.os_name(machine["os"])).installer,
                      syslog=syslog_target(base, cfg().syslog_port), kernel_args=cfg().kernel_args)
    if speaks and mode in (BootMode.LOCAL, BootMode.DISCOVER):
        _best_effort(store.seen, mac, ip)
    if mode == BootMode.LOCAL:
        efi = cfg().images_path / "local-boot" / "grubx64.efi"
        return render("ipxe/local-boot.ipxe.j2", base=base, mac=mac, hostname=machine["hostname"],
                      efi_chain=f"{base}/images/local-boot/grubx64.efi" if efi.exists() else "")
    if mode == BootMode.DEBUG:
        return render("ipxe/debug.ipxe.j2", base=base, mac=mac, installer_os=domain.RESCUE_OS.name)
    if mode == BootMode.PXE_DEBUG:
        return render("ipxe/pxe-debug.ipxe.j2", base=base, mac=mac)
    return render("ipxe/discover.ipxe.j2", base=base, mac=mac, method=discovery_method(),
                  action=cfg().discovery_action, installer_os=domain.RESCUE_OS.name,
                  kernel_args=cfg().kernel_args)


@bp.get("/dispatch")
def dispatch():
    """Always an iPXE script: a machine that gets anything else stops at an iPXE error prompt."""
    mac = mac_arg(request.args.get("mac"))
    for _ in range(3):
        try:
            return ipxe_response(_script(mac, request.remote_addr))
        except (StoreError, IllegalTransition):
            continue  # cancelled, forgotten or bound meanwhile: look at the machine again
    return ipxe_response(render("ipxe/wait.ipxe.j2", base=base_url(), mac=mac))
