"""`labctl delete machine NAME` (the same as `labctl provision forget`); with a labd, `labctl
delete server|user|role|rolebinding|token|... NAME` (labctl.fleet)."""

from __future__ import annotations

import click

from labctl import errors, fleet, output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx
from labctl.get import RESOURCES

ignore_not_found_option = click.option(
    "--ignore-not-found", is_flag=True, help="A machine that does not exist is no error (exit 0, nothing printed).")


def forget(obj: Ctx, target: str, ignore_not_found: bool = False) -> None:
    """Remove a machine from all of the bastion's state (it is rediscovered at its next PXE boot)."""
    try:
        m = targets.resolve_target(obj.client, target)
        result = obj.client.delete(f"/api/machines/{m['mac']}")
    except errors.NotFound:
        if ignore_not_found:
            return
        raise
    output.emit(result, obj.output,
                lambda: click.echo(f"machine {m.get('hostname') or m['mac']} ({m['mac']}) deleted"))


@click.command()
@click.argument("resource", type=click.Choice(sorted({*RESOURCES, *(a for a in fleet.ALIASES if a not in ("audit",))})),
                metavar="RESOURCE")
@click.argument("name", shell_complete=complete_machines)
@ignore_not_found_option
@output_option
@pass_ctx
def delete(obj: Ctx, resource: str, name: str, ignore_not_found: bool) -> None:
    """Forget a machine (NAME: host name, MAC or IP); its next PXE boot discovers it again.

    With a labd: delete a server, bastion, agent, cluster, user, role, rolebinding (by id) or token (by id).
    """
    if resource in fleet.ALIASES:
        fleet.delete(obj, resource, name, ignore_not_found)
        return
    forget(obj, name, ignore_not_found)
