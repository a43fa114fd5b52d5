"""`labctl get machines [NAME]` (kubectl-style), shared with `labctl provision list`."""

from __future__ import annotations

import time
from typing import Any

import click

from labcore.domain import OS_NAMES, ROLE_NAMES
from labcore.lifecycle import STORED_STATES
from labctl import errors, output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx, watch_options

#: resource names and their aliases
RESOURCES = {"machines": "machines", "machine": "machines", "mc": "machines"}

filter_options = [
    click.option("--state", type=click.Choice([s.value for s in STORED_STATES]), help="Only machines in this state."),
    click.option("--role", type=click.Choice(ROLE_NAMES), help="Only machines with this role."),
    click.option("--os", "os_", type=click.Choice(OS_NAMES), help="Only machines with this OS."),
]


def with_filters(f):
    for opt in reversed(filter_options):
        f = opt(f)
    return f


def list_machines(obj: Ctx, name: str | None, filters: dict[str, Any], watch: bool, watch_timeout: float,
                  interval: float) -> None:
    """List (or show one machine), then optionally watch the event cursor and print what changes."""
    client, fmt = obj.client, obj.output
    cursor = client.last_event_id() if watch else 0
    if name:
        one = targets.resolve(client.machines(), name)
        output.machine(one, fmt)
    else:
        output.machines(client.machines(**{k: v for k, v in filters.items() if v}), fmt)
    if watch:
        watch_machines(obj, cursor, one["mac"] if name else None, filters, watch_timeout, interval)


def _wanted(m: dict[str, Any], filters: dict[str, Any]) -> bool:
    return m["state"] == "removed" or all(m.get(k) == v for k, v in filters.items() if v)


def watch_machines(obj: Ctx, cursor: int, mac: str | None, filters: dict[str, Any], timeout: float,
                   interval: float) -> None:
    """Poll /api/events?since=cursor; print each changed machine (a table row, a JSON line or a YAML
    document). Stops after ``timeout`` seconds (0 = never) or on Ctrl-C, cleanly."""
    client, fmt = obj.client, obj.output
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            events = client.events(since=cursor, mac=mac)
            if not events:
                continue
            cursor = events[-1]["id"]
            for changed in dict.fromkeys(e["mac"] for e in events):
                try:
                    m = {k: v for k, v in client.machine(changed).items() if k != "events"}
                except errors.NotFound:
                    m = {"mac": changed, "state": "removed"}
                if not _wanted(m, filters):
                    continue
                if fmt == "json":
                    click.echo(output.json.dumps(m, separators=(",", ":")))
                elif fmt == "yaml":
                    click.echo("---\n" + output.dump(m, "yaml"), nl=False)
                else:
                    output.machines([m], fmt, header=False)
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCES)), metavar="machines")
@click.argument("name", required=False, shell_complete=complete_machines)
@with_filters
@output_option
@watch_options
@pass_ctx
def get(obj: Ctx, resource: str, name: str | None, state, role, os_, watch, watch_timeout, interval) -> None:
    """List machines, or show the one NAME (a host name, MAC or IP)."""
    list_machines(obj, name, {"state": state, "role": role, "os": os_}, watch, watch_timeout, interval)
