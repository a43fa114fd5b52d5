"""`labctl describe machine NAME`: hardware, install configuration and the event history; with a
labd, `labctl describe server|bastion|... NAME` (labctl.fleet)."""

from __future__ import annotations

import click

from labctl import fleet, output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx
from labctl.get import RESOURCES


@click.command()
@click.argument("resource", type=click.Choice(sorted({*RESOURCES, *fleet.ALIASES})), metavar="RESOURCE")
@click.argument("name", shell_complete=complete_machines)
@click.option("--events", "n_events", type=click.IntRange(1, 5000), default=200, show_default=True,
              help="How many of the newest events to show.")
@output_option
@pass_ctx
def describe(obj: Ctx, resource: str, name: str, n_events: int) -> None:
    """Show one machine in detail (NAME: host name, MAC or IP), or one of labd's resources
    (server NAME: host name, MAC or id)."""
    if resource in fleet.ALIASES:
        fleet.describe(obj, resource, name)
        return
    m = targets.resolve_target(obj.client, name)
    output.describe(obj.client.get(f"/api/machines/{m['mac']}", events=n_events), obj.output)
