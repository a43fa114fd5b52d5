"""`lab-bastion`: run and administer a standalone bastion.

Every command takes --data-dir (default: $LAB_BASTION_DATA_DIR).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import urllib.parse
from pathlib import Path

import click
import pydantic

from labcore import bastion_config as configmod
from labcore import private

data_dir_option = click.option(
    "--data-dir",
    envvar=configmod.DATA_DIR_ENV,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The bastion's data directory (state.db, token, bastion.yaml, images). Env: LAB_BASTION_DATA_DIR.",
)


def _load(data_dir: Path, detect: bool = False, **overrides) -> configmod.Config:
    try:
        return configmod.load(data_dir, overrides=overrides, detect=detect)
    except configmod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run and administer a lab-platform bastion (PXE provisioning server)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@data_dir_option
@click.option("--listen", metavar="HOST:PORT", help="HTTP address (default 0.0.0.0:8080).")
@click.option("--workers", type=int, help="gunicorn worker processes (default 4).")
@click.option("--syslog-port", type=int, help="Port (UDP and TCP) of the installer syslog listener (default 5514).")
@click.option("--no-dnsmasq", is_flag=True, help="Do not start dnsmasq (DHCP/TFTP is provided elsewhere).")
@click.option("--interface", metavar="IFACE", help="Provisioning interface for dnsmasq (default: auto-detected).")
@click.option("--dhcp-mode", type=click.Choice(["proxy", "full"]), help="proxy-DHCP beside the LAN's DHCP server (default), or full DHCP.")
@click.option("--dhcp-range", metavar="START,END", help="Address range for --dhcp-mode full.")
@click.option("--public-url", metavar="URL", help="URL machines use to reach this bastion (default http://<interface address>:<port>).")
def serve(data_dir, listen, workers, syslog_port, no_dnsmasq, interface, dhcp_mode, dhcp_range, public_url):
    """Run the bastion: nginx in front of gunicorn (the API and boot scripts), the syslog listener
    and dnsmasq. Exits with status 78 at once when it cannot start as configured (a taken port, an
    unusable data directory); the message says what to change."""
    from bastion_app.supervisor import EX_CONFIG, StartupError, Supervisor, children

    overrides = dict(listen=listen, workers=workers, syslog_port=syslog_port, interface=interface,
                     dhcp_mode=dhcp_mode, dhcp_range=dhcp_range, public_url=public_url)
    if no_dnsmasq:
        overrides["dnsmasq"] = False
    cfg = _load(data_dir, detect=True, **overrides)
    click.echo(f"lab-bastion: serving {cfg.data_path} on {cfg.listen} (machines use {cfg.base_url()})", err=True)
    warning = unreachable_warning(cfg)
    if warning:
        click.echo(f"lab-bastion: warning: {warning}", err=True)
    try:
        try:
            specs = children(cfg)
        except OSError as exc:  # dnsmasq's files in the data directory, nginx's in the runtime directory
            raise StartupError(f"cannot write the bastion's files: {exc}") from None
        sys.exit(Supervisor(cfg, specs).run())
    except configmod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except StartupError as exc:
        click.echo(f"lab-bastion serve: {exc}", err=True)
        sys.exit(EX_CONFIG)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def unreachable_warning(cfg: configmod.Config) -> str | None:
    """What is wrong when the bastion listens on loopback only but tells machines another address
    (they would get no boot script, no kickstart, no artefact), or None."""
    told = urllib.parse.urlsplit(cfg.base_url()).hostname or ""
    if not _loopback(cfg.listen_host) or _loopback(told):
        return None
    return (f"serve listens on {cfg.listen_host} only, but tells machines {cfg.base_url()}: they cannot reach it "
            f"there; listen on that address or on every one (--listen 0.0.0.0:{cfg.listen_port})")


@main.command()
@data_dir_option
def token(data_dir):
    """Print the operator token (created on first use, file mode 0600) of the bastion in the data
    directory: one that has served already, or one configured (bastion.yaml) that has not yet."""
    from bastion_app.auth import ensure_token

    if not any((data_dir / name).exists() for name in ("token", "state.db", configmod.CONFIG_NAME)):
        raise click.ClickException(
            f"{data_dir} holds no bastion (no token, state.db or {configmod.CONFIG_NAME}): check the path, or "
            f"start a bastion there first with `lab-bastion serve --data-dir {data_dir}`")
    cfg = _load(data_dir)
    click.echo(ensure_token(cfg.token_path))


@main.command()
@data_dir_option
@click.option("--labd", "labd_url", required=True, metavar="URL", help="labd's API, e.g. https://labd.example:8443.")
@click.option("--token", required=True, envvar="LAB_BASTION_JOIN_TOKEN", metavar="JOIN",
              help="The join token `labctl create token --kind bastion` printed (it pins labd's CA). "
              "Env: LAB_BASTION_JOIN_TOKEN.")
@click.option("--name", metavar="NAME", help="This bastion's name in labd (default: the host name).")
@click.option("--cloud", metavar="NAME", help="Its cloud (default: from the token's scope, else 'default').")
@click.option("--environment", metavar="NAME", help="Its environment (default: from the token's scope, else 'default').")
def join(data_dir, labd_url, token, name, cloud, environment):
    """Enroll this bastion with labd: make a key here (it never leaves; <data dir>/link/key.pem,
    0600), send a certificate request with the join token, check labd's CA against the token's pin
    and store the certificate labd signs. `lab-bastion serve` then keeps the link to labd's hub."""
    import socket

    from labcore import enroll

    cfg = _load(data_dir)
    name = name or socket.gethostname().split(".")[0]
    facts = {k: val for k, val in (("cloud", cloud), ("environment", environment)) if val}
    from labcore.link import software_version

    facts["software"] = software_version()
    try:
        out = enroll.enroll(labd_url, token, "bastion", name, facts)
    except enroll.EnrollError as exc:
        raise click.ClickException(str(exc)) from None
    enroll.store_identity(cfg.link_path, out["key"], out["certificate"], out["ca"],
                          meta={"id": out["id"], "kind": "bastion", "name": name, "hub": out["hub"],
                                "labd": labd_url.rstrip("/")})
    click.echo(f"lab-bastion: joined labd {labd_url} as bastion {name} ({out['id']}); certificate valid until "
               f"{out['expires_at']}; hub {out['hub']}. Restart `lab-bastion serve` to start the link.")


@main.command("export")
@data_dir_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE (mode 0600: it holds install tokens) instead of stdout.")
def export_cmd(data_dir, output):
    """Write the state as the seed's state.json (discovered / install_queue / installed / debug)."""
    from bastion_app.store import Store

    cfg = _load(data_dir)
    doc = json.dumps(Store.from_config(cfg).export_state(), indent=2, sort_keys=True) + "\n"
    if output:  # live install tokens inside: mode 0600, like state.db
        private.write(output, doc)
    else:
        click.echo(doc, nl=False)


@main.command("import")
@data_dir_option
@click.argument("source", type=click.File("r"))
@click.option("--replace", is_flag=True, help="Overwrite machines that are already in the store.")
def import_cmd(data_dir, source, replace):
    """Load a state.json (seed shape). All or nothing: a bad entry changes nothing."""
    from bastion_app.stateio import validate_state_doc
    from bastion_app.store import Store, StoreError

    cfg = _load(data_dir)
    try:
        doc = validate_state_doc(json.load(source))
        n = Store.from_config(cfg).import_state(doc, actor="lab-bastion import", replace=replace)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{source.name}: not valid JSON: {exc}") from None
    except (pydantic.ValidationError, ValueError, StoreError) as exc:
        raise click.ClickException(f"{source.name}: {exc}") from None
    click.echo(f"imported {n} machine(s)")


@main.command("config")
@data_dir_option
def show_config(data_dir):
    """Print the effective configuration (file, environment and auto-detected network)."""
    import yaml

    cfg = _load(data_dir, detect=True)
    click.echo(yaml.safe_dump({**cfg.as_dict(), "base_url": cfg.base_url()}, sort_keys=True), nl=False)


@main.group()
def images() -> None:
    """Boot artefacts: installer kernels and initrds, the discovery environment."""


@images.command("build-discovery")
@data_dir_option
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where packages and built images are cached (default /var/cache/lab-platform/discovery for root).")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has an image for the same inputs.")
def build_discovery_cmd(data_dir, cache_dir, force):
    """Build the discovery kernel + initramfs from Debian's packages into <data>/images/discovery."""
    from bastion_app.images.discovery import DiscoveryBuildError, build_discovery

    cfg = _load(data_dir)
    try:
        img = build_discovery(cache_dir, cfg.images_path / "discovery", force=force,
                              progress=lambda msg: click.echo(msg, err=True))
    except DiscoveryBuildError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{img.kernel}\n{img.initrd}")


@images.command("build-local-boot")
@data_dir_option
def build_local_boot_cmd(data_dir):
    """Build the UEFI local-boot GRUB (<data>/images/local-boot/grubx64.efi) that /dispatch chains
    for installed machines: it finds the installed system's EFI loader on a local disk."""
    from bastion_app.images.local_boot import LocalBootBuildError, build_local_boot

    cfg = _load(data_dir)
    try:
        out = build_local_boot(cfg.images_path / "local-boot", progress=lambda msg: click.echo(msg, err=True))
    except LocalBootBuildError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(out))


@images.command("build-installer")
@data_dir_option
@click.option("--force", is_flag=True, help="Rebuild even when the cache has one for the same inputs.")
def build_installer_cmd(data_dir, force):
    """Build the image deploy's installer environment into <data>/images/installer: the discovery
    kernel and initramfs plus the install tools (copied from this host with their libraries) and
    the LVM and filesystem modules. `build-os` runs it too."""
    from bastion_app.images.installer import InstallerBuildError, build_installer

    cfg = _load(data_dir)
    try:
        build_installer(cfg.images_path, force=force, progress=lambda msg: click.echo(msg, err=True))
    except InstallerBuildError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(cfg.images_path / "installer"))


@images.command("build-os")
@data_dir_option
@click.argument("os_names", metavar="OS...", nargs=-1, required=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where built images are cached (default /var/cache/lab-platform/os for root).")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has an image for the same inputs "
              "(to take in new security updates).")
def build_os_cmd(data_dir, os_names, cache_dir, force):
    """Build an image-deployed OS (e.g. debian-12, debian-13) from Debian's archive into
    <data>/images/<os>/ (rootfs.tar.zst and its manifest rootfs.json), and the installer
    environment that writes it. Needs root (debootstrap). Cached: a second build with the same
    inputs (suite, mirror, packages, recipe) takes seconds."""
    from bastion_app.images.installer import InstallerBuildError, build_installer
    from bastion_app.images.osimage import OsImageError, build_os, image_os

    cfg = _load(data_dir)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        for name in os_names:
            image_os(name)  # every name is checked before anything is built
        for name in os_names:
            img = build_os(name, cfg.images_path, cache_dir=cache_dir, force=force, progress=say)
            click.echo(f"{img.rootfs} sha256:{img.sha256}{' (cached)' if img.cached else ''}")
        build_installer(cfg.images_path, progress=say)
    except (OsImageError, InstallerBuildError) as exc:
        raise click.ClickException(str(exc)) from None


@images.command("agent-wheels")
@data_dir_option
@click.argument("wheelhouse", type=click.Path(exists=True, file_okay=False, path_type=Path))
def images_agent_wheels_cmd(data_dir, wheelhouse):
    """Serve lab-agent to the machines this bastion installs: copy a wheelhouse (`labctl init
    bastion wheelhouse DIR`; pip's wheel is added from this Python when missing) to
    <data>/images/lab-agent. Installs carry the agent once the bastion is enrolled in labd
    (`lab-bastion join`; docs/agent.md)."""
    from bastion_app.agent_install import AgentWheelsError, install_wheels

    cfg = _load(data_dir)
    try:
        names = install_wheels(wheelhouse, cfg.images_path)
    except AgentWheelsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{cfg.images_path / 'lab-agent'}: {len(names)} wheel(s)")


@images.command("list")
@data_dir_option
def images_list_cmd(data_dir):
    """What the bastion can serve: each boot artefact directory under <data>/images, whether its
    files are there, their size, and for built OS images their build date and sha256."""
    from bastion_app.images.osimage import read_manifest
    from labcore.bastion_files import BOOT_ARTEFACTS, ROOTFS_MANIFEST

    cfg = _load(data_dir)
    rows = [("NAME", "STATUS", "SIZE", "DETAIL")]
    for name, files in BOOT_ARTEFACTS.items():
        folder = cfg.images_path / name
        present = [f for f in files if (folder / f).is_file()]
        size = sum((folder / f).stat().st_size for f in present)
        status = "ready" if len(present) == len(files) else ("missing" if not present else "incomplete")
        detail = ""
        if ROOTFS_MANIFEST in files and (folder / ROOTFS_MANIFEST).is_file():
            m = read_manifest(cfg.images_path, name)
            if m is None:
                status, detail = "invalid", f"{ROOTFS_MANIFEST} cannot be read"
            else:
                detail = (f"{m.get('suite')} kernel {m.get('kernel')}, {len(m.get('packages', []))} packages, "
                          f"built {m.get('built_at')}, sha256:{str(m.get('sha256'))[:12]}")
        elif status != "ready":
            detail = "missing " + ", ".join(f for f in files if f not in present)
        rows.append((name, status, f"{size / 1e6:.1f} MB" if present else "-", detail))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])


@images.command("sync")
@data_dir_option
@click.option("--os", "oses", multiple=True, metavar="NAME",
              help="Only this OS (repeatable; default: every OS in the manifest, e.g. fedora-43, ubuntu-26.04).")
@click.option("--force", is_flag=True, help="Download again even when the files are already there.")
def images_sync_cmd(data_dir, oses, force):
    """Download the installer kernels, initrds, stage2 and ISOs into <data>/images/<os>/.

    URLs and checksums come from the built-in manifest and <data>/images.yaml. Interrupted
    downloads resume; a file is renamed into place only after its checksum matched."""
    import time

    from bastion_app.images.sync import ImageError, sync

    cfg = _load(data_dir)
    last = {"t": 0.0}

    def progress(label, done, total):
        now = time.monotonic()
        if now - last["t"] < 1.0 and done != total:
            return
        last["t"] = now
        pct = f"{100 * done // total:3d}%" if total else "    "
        size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
        click.echo(f"  {label}: {pct} {size}", err=True)

    try:
        results = sync(cfg.data_path, list(oses) or None, force=force, progress=progress)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    for r in results:
        note = "" if r.verified else "  (no checksum configured: pin sha256 in images.yaml)"
        click.echo(f"{r.label}: {r.action} sha256:{r.sha256}{note}")


@main.command("dnsmasq-config")
@data_dir_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Configuration file to write (rewritten only when its content changes).")
@click.option("--tftp-root", type=click.Path(file_okay=False, path_type=Path), help="TFTP root to fill with iPXE (default <data>/tftp).")
def dnsmasq_config_cmd(data_dir, output, tftp_root):
    """Write the bastion's dnsmasq configuration and TFTP root for a dnsmasq that runs as its own
    service (bastion.yaml then says `dnsmasq: false`). Prints `changed` or `unchanged`."""
    from bastion_app import dnsmasq

    cfg = _load(data_dir, detect=True)
    try:
        changed = dnsmasq.write_config(cfg, output, tftp_root)
    except dnsmasq.DnsmasqError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("changed" if changed else "unchanged")


if __name__ == "__main__":
    main()
