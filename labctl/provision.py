"""`labctl provision list|install|reprovision|cancel|forget|debug|logs|makeiso`: the machine lifecycle."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from labcore import validate
from labcore.domain import DEBUG_MODES, OS_NAMES, ROLE_NAMES
from labcore.lifecycle import changed_params, describe_changes
from labctl import delete, errors, follow, get, output, power, routed, runner, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx, watch_options
from labctl.makeiso import makeiso


@click.group()
def provision() -> None:
    """Discover, install, reinstall, debug and forget bare-metal machines."""


@provision.command("list")
@get.with_filters
@output_option
@watch_options
@pass_ctx
def list_cmd(obj: Ctx, state, role, os_, selector, watch, watch_timeout, interval) -> None:
    """List the machines the bastion knows (same as `labctl get machines`)."""
    get.list_machines(obj, None, {"state": state, "role": role, "os": os_}, watch, watch_timeout, interval, selector)


def _v(fn, value, field):
    try:
        return fn(value, field)
    except validate.ValidationError as exc:
        raise errors.UsageError(f"invalid --{field.replace('_', '-')}: {exc.message}", "nothing was sent") from None


def read_ssh_keys(files: tuple[str, ...]) -> list[str]:
    keys: list[str] = []
    for f in files:
        try:
            text = Path(f).expanduser().read_text()
        except OSError as exc:
            raise errors.UsageError(f"cannot read --ssh-key {f}: {exc.strerror}", "nothing was sent") from None
        try:
            keys += validate.ssh_keys(text)
        except validate.ValidationError as exc:
            raise errors.UsageError(f"--ssh-key {f}: {exc.message}", "pass a public key file (*.pub)") from None
    return _v(validate.ssh_keys, keys, "ssh_key")


def _install_bmc(driver, address, username, password_stdin, system_id, insecure) -> dict | None:
    """The install request's ``bmc`` from the --bmc-* flags (None without --bmc-driver)."""
    if not driver:
        if address or username or password_stdin or system_id or insecure:
            raise errors.UsageError("the --bmc-* options need --bmc-driver", "nothing was sent")
        return None
    if not (address and username and password_stdin):
        raise errors.UsageError("--bmc-driver needs --bmc-address, --bmc-username and --bmc-password-stdin",
                                "echo -n \"$PASSWORD\" | labctl provision install TARGET ... --bmc-password-stdin")
    return power.bmc_body(driver, address, username, power.read_password(), system_id, insecure, flags="--bmc-")


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@click.option("--hostname", required=True, help="RFC 1123 host name the machine gets.")
@click.option("--role", required=True, type=click.Choice(ROLE_NAMES), help="What the machine becomes (labctl roles).")
@click.option("--os", "os_", required=True, type=click.Choice(OS_NAMES), help="Operating system to install.")
@click.option("--disk", default="", help="Install disk, e.g. /dev/nvme0n1 (default: auto-detect, NVMe first).")
@click.option("--ssh-key", "ssh_key_files", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="Public key file for root/admin login (repeatable).")
@click.option("--wait", is_flag=True, help="Wait until the machine is installed, with progress.")
@click.option("--timeout", type=click.FloatRange(1), default=7200, show_default=True, metavar="SECONDS",
              help="How long --wait waits.")
@click.option("--bmc-driver", type=click.Choice(validate.BMC_DRIVERS),
              help="Also record the machine's BMC (as labctl power set): how the bastion talks to it.")
@click.option("--bmc-address", metavar="[SCHEME://]HOST[:PORT]", help="The BMC's address (with --bmc-driver).")
@click.option("--bmc-username", help="The BMC user (with --bmc-driver).")
@click.option("--bmc-password-stdin", is_flag=True, help="Read the BMC password from stdin (with --bmc-driver).")
@click.option("--bmc-system-id", help="Redfish: the system's id (default: the BMC's only system).")
@click.option("--bmc-insecure", is_flag=True, help="Redfish over https: do not check the BMC's certificate.")
@routed.options
@output_option
@pass_ctx
def install(obj: Ctx, target, hostname, role, os_, disk, ssh_key_files, wait, timeout, bmc_driver, bmc_address,
            bmc_username, bmc_password_stdin, bmc_system_id, bmc_insecure, via_bastion, queue) -> None:
    """Queue TARGET (host name, MAC or IP) for installation at its next PXE boot.

    With --bmc-driver, --bmc-address, --bmc-username and --bmc-password-stdin the same request records
    the machine's BMC (sealed on the bastion; labctl power uses it). Every value is validated before
    anything is sent. With a labd context TARGET is a host name or MAC and the command
    goes to the bastion that holds it."""
    body = {
        "hostname": _v(validate.hostname, hostname, "hostname"),
        "role": _v(validate.role, role, "role"),
        "os": _v(validate.os_name, os_, "os"),
        "disk": _v(validate.disk, disk, "disk"),
        "ssh_keys": read_ssh_keys(ssh_key_files),
    }
    bmc = _install_bmc(bmc_driver, bmc_address, bmc_username, bmc_password_stdin, bmc_system_id, bmc_insecure)
    if routed.check(obj, via_bastion, queue):
        if wait:
            raise errors.UsageError("--wait needs a bastion context", "follow it with labctl get servers")
        if bmc:  # BMC passwords are not sent through labd (they would sit in its command rows)
            raise errors.UsageError("--bmc-* needs a bastion context", "record the BMC there: labctl power set")
        result = routed.send(obj, target, "install", body, via_bastion, queue)
        routed.report(obj, result, target, f"{body['os']} as {body['role']} queued; it installs at its next PXE boot")
        return
    m = targets.resolve_target(obj.client, target)
    cursor = obj.client.last_event_id() if wait else None
    result = obj.client.post("/api/install", {"mac": m["mac"], **body, **({"bmc": bmc} if bmc else {})})
    changes = describe_changes(changed_params(m, body))
    output.emit(result, obj.output, lambda: click.echo(
        f"{body['hostname']} ({m['mac']}) {'re-queued' if changes else 'queued'}: {body['os']} as {body['role']}"
        f"{f' (changed: {changes})' if changes else ''}; it installs at its next PXE boot"))
    if wait:
        follow.wait_installed(obj.client, m["mac"], body["hostname"], timeout=timeout, cursor=cursor)
        click.echo(f"{body['hostname']} installed", err=obj.output in ("json", "yaml"))


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@click.option("--no-reboot", is_flag=True, help="Only queue the reinstall; do not touch the machine.")
@click.option("--power", "use_power", is_flag=True,
              help="Reboot through the machine's BMC instead of SSH: next boot network, then a power cycle.")
@click.option("--os", "os_", type=click.Choice(OS_NAMES), help="Install another OS this time.")
@click.option("--role", type=click.Choice(ROLE_NAMES), help="Change the role.")
@click.option("--reason", default="", help="Why (recorded in the event history).")
@click.option("--ssh-user", default="root", show_default=True, help="User the playbook logs in as.")
@click.option("--ssh-private-key", type=click.Path(dir_okay=False, exists=True), help="Private key for the playbook's SSH login.")
@click.option("--playbook", type=click.Path(dir_okay=False, exists=True),
              help="Playbook to run instead of the collection's playbooks/reprovision.yml.")
@click.option("--timeout", type=click.IntRange(10), default=600, show_default=True, metavar="SECONDS",
              help="Limit for each playbook run.")
@routed.options
@output_option
@pass_ctx
def reprovision(obj: Ctx, target, no_reboot, use_power, os_, role, reason, ssh_user, ssh_private_key, playbook,
                timeout, via_bastion, queue) -> None:
    """Reinstall TARGET: check that playbooks/reprovision.yml can run on it (a --check run over SSH),
    queue the reinstall, then (unless --no-reboot) run the playbook through ansible-runner: it sets the
    next boot to PXE (efibootmgr --bootnext on UEFI) and reboots the machine. The playbook's result is
    labctl's exit code (10 + ansible rc on failure); a failed check queues nothing.

    With --power, no SSH: the bastion sets the next boot to the network through the machine's BMC
    (labctl power set) and power-cycles it; a machine without a usable BMC record queues nothing."""
    body = {"os": os_, "role": role, "reason": _v(lambda v, f: validate.text(v, f, 256), reason, "reason")}
    if routed.check(obj, via_bastion, queue):
        if use_power:
            raise errors.UsageError("--power needs a bastion context", "use that bastion's context, or --no-reboot")
        if not no_reboot:
            raise errors.UsageError("through labd a reinstall is only queued", "add --no-reboot and power-cycle the machine")
        result = routed.send(obj, target, "reprovision", {k: v for k, v in body.items() if v}, via_bastion, queue)
        routed.report(obj, result, target, "queued for reinstall")
        return
    m = targets.resolve_target(obj.client, target)
    name = m.get("hostname") or m["mac"]
    reboot = None
    if use_power and no_reboot:
        raise errors.UsageError("--power reboots through the BMC, --no-reboot does not reboot: choose one")
    if use_power:
        bmc = obj.client.get(f"/api/machines/{m['mac']}/bmc")  # 404 before anything is queued
        if not bmc.get("address") or not bmc.get("credentials"):
            raise errors.UsageError(f"{name}'s BMC has no address or credentials yet; nothing was queued",
                                    "labctl power set TARGET --driver ... --address ... --username ... --password-stdin")
        reboot = functools.partial(_power_reboot, obj, m)
    elif not no_reboot:  # everything the run needs is checked before the reinstall is queued
        if not m.get("ip"):
            raise errors.UsageError(f"{name} has no known IP address, so it cannot be rebooted over SSH",
                                    "rerun with --no-reboot and power-cycle it yourself")
        hostvars = {"ansible_host": m["ip"], "ansible_user": ssh_user, "lab_mac": m["mac"]}
        if ssh_private_key:
            hostvars["ansible_ssh_private_key_file"] = str(Path(ssh_private_key).resolve())
        reboot = functools.partial(_reboot, obj, name, hostvars, playbook or runner.playbook_path("reprovision.yml"), timeout)
        try:
            runner.check(reboot(check_mode=True), f"the check run of the reprovision playbook on {name}")
        except errors.PlaybookFailed as exc:
            exc.message += "; nothing was queued"
            raise
    result = obj.client.post(f"/api/machines/{m['mac']}/reprovision", {k: v for k, v in body.items() if v})
    changes = describe_changes(changed_params(m, result))
    output.emit(result, obj.output, lambda: click.echo(
        f"{name} ({m['mac']}) queued for reinstall{f' (changed: {changes})' if changes else ''}"))
    if reboot is None:
        return
    if use_power:
        reboot()
        return
    try:
        runner.check(reboot(check_mode=False), f"reprovision of {name}")
    except errors.PlaybookFailed as exc:
        exc.message = f"{name} is queued for reinstall, but {exc.message}"
        exc.hint = (f"{exc.hint}; it reinstalls at its next PXE boot (power-cycle it), "
                    f"or withdraw the reinstall: labctl provision cancel {target}")
        raise


def _power_reboot(obj: Ctx, m: dict) -> None:

    name = m.get("hostname") or m["mac"]
    try:
        r = power.pxe_cycle(obj, m)
    except errors.LabctlError as exc:
        exc.message = f"{name} is queued, but the BMC call failed: {exc.message}"
        exc.hint = f"power-cycle it yourself, or withdraw it: labctl provision cancel {name}"
        raise
    if obj.output not in ("json", "yaml"):
        click.echo(f"{name}: next boot network, power-cycled through its {r['driver']} BMC (now {r['power']})")


def _reboot(obj: Ctx, name: str, hostvars: dict, book, timeout: int, *, check_mode: bool) -> runner.RunResult:
    """One run of the reprovision playbook on one machine (with check_mode: --check --diff, quiet)."""
    return runner.run_playbook(
        book,
        # the group the lab.platform.lab inventory gives a machine whose reinstall is queued
        inventory=runner.inventory({name: hostvars}, group="lab_state_install_queued"),
        extravars={"lab_bastion_url": obj.settings["bastionUrl"]}, check_mode=check_mode,
        name=f"reprovision-{name}{'-check' if check_mode else ''}", timeout=timeout,
        quiet=check_mode or obj.output in ("json", "yaml"))


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@click.option("--reason", default="", help="Why (recorded in the event history).")
@routed.options
@output_option
@pass_ctx
def cancel(obj: Ctx, target, reason, via_bastion, queue) -> None:
    """Withdraw TARGET's queued, running or failed install. The machine is discovered again: at its
    next PXE boot it gets the discovery image, not an installer."""
    body = {"reason": _v(lambda v, f: validate.text(v, f, 256), reason, "reason")}
    if routed.check(obj, via_bastion, queue):
        result = routed.send(obj, target, "cancel", {k: v for k, v in body.items() if v}, via_bastion, queue)
        routed.report(obj, result, target, "install cancelled; it is discovered again")
        return
    m = targets.resolve_target(obj.client, target)
    name = m.get("hostname") or m["mac"]
    result = obj.client.post(f"/api/machines/{m['mac']}/cancel", {k: v for k, v in body.items() if v})
    output.emit(result, obj.output, lambda: click.echo(
        f"{name} ({m['mac']}): {m['state']} install cancelled; it is discovered again and PXE-boots into discovery"))


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@delete.ignore_not_found_option
@routed.options
@output_option
@pass_ctx
def forget(obj: Ctx, target, ignore_not_found, via_bastion, queue) -> None:
    """Remove TARGET from all of the bastion's state (same as `labctl delete machine`)."""
    if routed.check(obj, via_bastion, queue):
        try:
            result = routed.send(obj, target, "forget", {}, via_bastion, queue)
        except errors.NotFound:
            if ignore_not_found:
                return
            raise
        routed.report(obj, result, target, "forgotten by its bastion")
        return
    delete.forget(obj, target, ignore_not_found)


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@click.option("--mode", type=click.Choice(DEBUG_MODES), default="rescue", show_default=True,
              help="rescue: installer rescue shell with SSH; pxe: iPXE diagnostics shell.")
@click.option("--power", "use_power", is_flag=True,
              help="Boot it now through its BMC: next boot network, then a power cycle.")
@routed.options
@output_option
@pass_ctx
def debug(obj: Ctx, target, mode, use_power, via_bastion, queue) -> None:
    """Boot TARGET once into a debug environment at its next PXE boot, then back to normal."""
    if routed.check(obj, via_bastion, queue):
        if use_power:
            raise errors.UsageError("--power needs a bastion context", "use that bastion's context")
        result = routed.send(obj, target, "debug", {"mode": mode}, via_bastion, queue)
        routed.report(obj, result, target, f"boots into {mode} debug once at its next PXE boot")
        return
    m = targets.resolve_target(obj.client, target)
    result = obj.client.post("/api/debug", {"mac": m["mac"], "mode": mode})
    output.emit(result, obj.output, lambda: click.echo(
        f"{m.get('hostname') or m['mac']} boots into {mode} debug once at its next PXE boot"))
    if use_power:
        _power_reboot(obj, m)


@provision.command()
@click.argument("target", shell_complete=complete_machines)
@click.option("-f", "--follow", "follow_", is_flag=True, help="Follow the install live (progress bar, then log lines).")
@click.option("--tail", type=click.IntRange(1, 5000), default=200, show_default=True, help="Lines to show without -f.")
@click.option("--stall-timeout", type=click.FloatRange(1), default=120, show_default=True, metavar="SECONDS",
              help="With -f against a bastion: give up when it sends nothing (not even a heartbeat) for this long.")
@routed.bastion_option
@output_option
@pass_ctx
def logs(obj: Ctx, target, follow_, tail, stall_timeout, via_bastion) -> None:
    """Show TARGET's installer log. With -f, follow the bastion's event stream until the install
    ends: exit 0 when installed, 7 when it failed or stalled.

    With a labd context the log is read on the bastion that holds TARGET (a host name or MAC),
    through its link; Ctrl-C stops the follow there."""
    if routed.check(obj, via_bastion, False):
        routed.logs(obj, target, follow_, tail, via_bastion)
        return
    m = targets.resolve_target(obj.client, target)
    name = m.get("hostname") or m["mac"]
    if follow_:
        follow.follow_logs(obj.client, m["mac"], name, stall_timeout=stall_timeout)
        click.echo(f"{name} installed")
        return
    doc = obj.client.get(f"/api/logs/{m['mac']}", limit=tail)
    output.emit(doc, obj.output, lambda: [click.echo(f"{r.get('ts', '')} {r.get('text', '')}") for r in doc.get("lines", [])])


provision.add_command(makeiso)
