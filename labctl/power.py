"""`labctl power set|show|status|on|off|cycle`: machines' BMCs, through the bastion.

The bastion makes the BMC calls (the BMCs live on its network) and records each result as an
event; labctl names the machines and, for several, asks the bastion for one batch (POST
/api/power) that it runs side by side (--max-parallel) with a pause between starts (--stagger: a
rack's circuits do not take every inrush at once), showing progress as each one ends.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from labcore import validate
from labctl import errors, get, output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx


@click.group()
def power() -> None:
    """Power machines on, off or cycle them through their BMC (Redfish or IPMI)."""


def bmc_body(driver: str, address: str, username: str, password: str, system_id: str | None, insecure: bool,
             flags: str = "--") -> dict:
    """The validated body of PUT /api/machines/<mac>/bmc (and of an install request's ``bmc``, whose
    options are named ``--bmc-...``: ``flags``)."""
    def check(fn, value, field: str, *args):
        try:
            return fn(value, *args, field) if args else fn(value, field)
        except validate.ValidationError as exc:
            raise errors.UsageError(f"invalid {flags}{field.replace('_', '-')}: {exc.message}",
                                    "nothing was sent") from None

    check(validate.bmc_address, address, "address", driver)
    body = {"driver": driver, "address": address, "username": check(validate.bmc_username, username, "username"),
            "password": check(validate.bmc_password, password, "password")}
    if driver != "redfish":
        if system_id or insecure:
            raise errors.UsageError(f"{flags}system-id and {flags}insecure are for Redfish only", "nothing was sent")
        return body
    body["verify_tls"] = not insecure
    if system_id:
        body["system_id"] = check(validate.bmc_system_id, system_id, "system_id")
    return body


def read_password() -> str:
    """The password from stdin (its first line): never an argument, which `ps` would show."""
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise errors.UsageError("--password-stdin: stdin is empty", "echo -n \"$PASSWORD\" | labctl power set ...")
    return line


@power.command("set")
@click.argument("target", shell_complete=complete_machines)
@click.option("--driver", type=click.Choice(validate.BMC_DRIVERS), required=True, help="How the bastion talks to the BMC.")
@click.option("--address", required=True, metavar="[SCHEME://]HOST[:PORT]",
              help="The BMC: an IP address ([v6] in brackets) or host name, optional port; for Redfish "
                   "optionally http:// (default https://).")
@click.option("--username", required=True, help="The BMC user.")
@click.option("--password-stdin", is_flag=True, required=True, help="Read the BMC password from stdin (required: "
                                                                     "never on the command line).")
@click.option("--system-id", help="Redfish: the system's id (/redfish/v1/Systems/<id>); default: the BMC's only system.")
@click.option("--insecure", is_flag=True, help="Redfish over https: do not check the BMC's certificate.")
@output_option
@pass_ctx
def set_cmd(obj: Ctx, target, driver, address, username, password_stdin, system_id, insecure) -> None:
    """Record TARGET's BMC. The bastion seals the credentials at rest and never shows them again."""
    body = bmc_body(driver, address, username, read_password(), system_id, insecure)
    m = targets.resolve_target(obj.client, target)
    result = obj.client.put(f"/api/machines/{m['mac']}/bmc", body)
    output.emit(result, obj.output, lambda: click.echo(
        f"{m.get('hostname') or m['mac']}: BMC {driver} {address} recorded (credentials sealed on the bastion)"))


@power.command()
@click.argument("target", shell_complete=complete_machines)
@output_option
@pass_ctx
def show(obj: Ctx, target) -> None:
    """Show TARGET's BMC record (never its credentials)."""
    m = targets.resolve_target(obj.client, target)
    b = obj.client.get(f"/api/machines/{m['mac']}/bmc")
    output.emit(b, obj.output, lambda: click.echo(
        f"{m.get('hostname') or m['mac']}: {b['driver']} {b['address'] or '(address unknown: seen by discovery)'}"
        f"{' system ' + b['system_id'] if b.get('system_id') else ''}; credentials "
        f"{'stored' if b['credentials'] else 'missing'}; source {b['source']}"))


def _machines(obj: Ctx, names: tuple[str, ...], selector: tuple[str, ...], state, role, os_) -> list[dict[str, Any]]:
    if names and (selector or state or role or os_):
        raise errors.UsageError("name machines or select them (-l, --state, --role, --os), not both")
    machines = obj.client.machines()
    if names:
        return [targets.resolve(machines, n) for n in names]
    if not (selector or state or role or os_):
        raise errors.UsageError("name at least one machine, or select some with -l/--state/--role/--os")
    wanted = get.parse_selector(selector)
    filters = {"state": state, "role": role, "os": os_}
    found = [m for m in machines if all(m.get(k) == v for k, v in filters.items() if v) and get.selected(m, wanted)]
    if not found:
        raise errors.NotFound("no machine matches the selection")
    return found


def run_batch(client, macs: list[str], body: dict | None, *, max_parallel: int = 10, stagger: float = 0.0,
              progress=None) -> list[dict[str, Any]]:
    """One power call per machine (``body`` None: the status), made by the bastion (POST /api/power)
    at most ``max_parallel`` at a time, starts at least ``stagger`` seconds apart;
    ``progress(done, total, result)`` after each. A result is the bastion's answer, or
    ``{"mac", "error", ...}``. The one home of batch power calls."""
    request = {"macs": macs, "action": "status", **(body or {}), "max_parallel": max_parallel, "stagger": stagger}
    results: list[dict[str, Any]] = []
    for r in client.power_batch(request):
        if "summary" in r:
            break
        results.append(r)
        if progress:
            progress(len(results), len(macs), r)
    if len(results) != len(set(macs)):
        raise errors.LabctlError(f"the bastion's answer ended after {len(results)} of {len(macs)} machines",
                                 "each call that was made is an event on its machine: labctl describe machine TARGET")
    order = {mac: i for i, mac in enumerate(macs)}
    return sorted(results, key=lambda r: order[r["mac"]])


def _batch_options(f):
    for opt in reversed([
        click.argument("targets_", metavar="[TARGET]...", nargs=-1, shell_complete=complete_machines),
        *get.filter_options,
        click.option("--max-parallel", type=click.IntRange(1, 100), default=10, show_default=True,
                     help="BMC calls at the same time."),
        click.option("--stagger", type=click.FloatRange(0, 60), default=0.0, show_default=True, metavar="SECONDS",
                     help="Least time between two starts (protects a rack's circuits at bring-up)."),
        output_option,
    ]):
        f = opt(f)
    return f


def _power(obj: Ctx, action: str | None, targets_, state, role, os_, selector, max_parallel, stagger,
           boot: str | None = None) -> list[dict[str, Any]]:
    machines = _machines(obj, targets_, selector, state, role, os_)
    names = {m["mac"]: m.get("hostname") or m["mac"] for m in machines}
    people = obj.output not in ("json", "yaml")

    def progress(done, total, r):
        if people:
            what = f"error: {r['error']}" if "error" in r else f"{r['power']}{'' if r['changed'] else ' (unchanged)'}"
            click.echo(f"[{done}/{total}] {names[r['mac']]}: {what}" if total > 1 else f"{names[r['mac']]}: {what}")

    body = None if action is None else {"action": action, **({"boot": boot} if boot else {})}
    results = run_batch(obj.client, list(names), body, max_parallel=max_parallel, stagger=stagger, progress=progress)
    if not people:
        output.emit(results if len(results) > 1 else results[0], obj.output, lambda: None)
    failed = [r for r in results if "error" in r]
    if failed:
        raise errors.LabctlError(f"{len(failed)} of {len(results)} power calls failed: "
                                 + "; ".join(f"{names[r['mac']]}: {r['error']}" for r in failed[:5]),
                                 "each call is an event on its machine: labctl describe machine TARGET")
    return results


@power.command()
@_batch_options
@pass_ctx
def status(obj: Ctx, targets_, state, role, os_, selector, max_parallel, stagger) -> None:
    """Ask the machines' BMCs whether they are on."""
    _power(obj, None, targets_, state, role, os_, selector, max_parallel, stagger)


def _action_command(action: str, doc: str):
    @power.command(action, help=doc)
    @_batch_options
    @click.option("--boot", type=click.Choice(["network", "disk"]),
                  help="First set the next boot (once) to the network (PXE) or the disk.")
    @pass_ctx
    def cmd(obj: Ctx, targets_, state, role, os_, selector, max_parallel, stagger, boot) -> None:
        _power(obj, action, targets_, state, role, os_, selector, max_parallel, stagger, boot)

    return cmd


on = _action_command("on", "Power the machines on (a machine that is on is left alone).")
off = _action_command("off", "Power the machines off at once (no OS shutdown; one that is off is left alone).")
cycle = _action_command("cycle", "Power-cycle the machines: a hard reset if on, power on if off.")


def pxe_cycle(obj: Ctx, m: dict[str, Any]) -> dict[str, Any]:
    """Set the next boot to the network, then power-cycle, through the BMC (reprovision/debug --power)."""
    r = run_batch(obj.client, [m["mac"]], {"action": "cycle", "boot": "network"})[0]
    if "error" in r:
        raise errors.LabctlError(f"{m.get('hostname') or m['mac']}: {r['error']}",
                                 "check the BMC: labctl power show TARGET; labctl power status TARGET")
    return r
