"""`labctl delete machine NAME` (the same as `labctl provision forget`)."""

from __future__ import annotations

import click

from labctl import output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx
from labctl.get import RESOURCES


def forget(obj: Ctx, target: str) -> None:
    """Remove a machine from all of the bastion's state (it is rediscovered at its next PXE boot)."""
    m = targets.resolve_target(obj.client, target)
    result = obj.client.delete(f"/api/machines/{m['mac']}")
    output.emit(result, obj.output,
                lambda: click.echo(f"machine {m.get('hostname') or m['mac']} ({m['mac']}) deleted"))


@click.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCES)), metavar="machine")
@click.argument("name", shell_complete=complete_machines)
@output_option
@pass_ctx
def delete(obj: Ctx, resource: str, name: str) -> None:
    """Forget a machine (NAME: host name, MAC or IP); its next PXE boot discovers it again."""
    forget(obj, name)
