"""`labctl get machines [NAME]` (kubectl-style), shared with `labctl provision list`; with a labd
configured, `labctl get servers|bastions|agents|clusters|users|roles|rolebindings|tokens|audit`
(labctl.fleet)."""

from __future__ import annotations

import time
from typing import Any

import click

from labcore.domain import OS_NAMES, ROLE_NAMES
from labcore.lifecycle import STORED_STATES
from labctl import errors, fleet, output, targets
from labctl.context import Ctx, complete_machines, output_option, pass_ctx, watch_options

#: resource names and their aliases
RESOURCES = {"machines": "machines", "machine": "machines", "mc": "machines"}

#: what -l/--selector can select on: a machine's fields (the listing's columns)
SELECTOR_KEYS: dict[str, Any] = {
    "state": lambda m: m.get("state"), "role": lambda m: m.get("role"), "os": lambda m: m.get("os"),
    "hostname": lambda m: m.get("hostname"), "mac": lambda m: m.get("mac"), "ip": lambda m: m.get("ip"),
    "stage": lambda m: m.get("stage"), "firmware": lambda m: (m.get("hardware") or {}).get("firmware"),
}
Requirement = tuple[str, bool, str]  # key, equal (= or ==) or not (!=), value


def parse_selector(exprs: tuple[str, ...], any_key: bool = False) -> list[Requirement]:
    """kubectl's equality-based selectors: ``-l role=worker,os!=fedora-43`` (repeatable, all must hold).
    Keys are a machine's SELECTOR_KEYS, or anything with ``any_key`` (labd's resources check them)."""
    out: list[Requirement] = []
    for expr in exprs:
        for part in filter(None, (p.strip() for p in expr.split(","))):
            key, op, value = next(((k, o, v) for o in ("!=", "==", "=") for k, sep, v in [part.partition(o)] if sep),
                                  (part, "", ""))
            key, value = key.strip(), value.strip()
            if not op or not value:
                raise errors.UsageError(f"invalid selector {part!r}: use KEY=VALUE or KEY!=VALUE (comma-separated)",
                                        "e.g. -l role=worker,os=fedora-43")
            if not any_key and key not in SELECTOR_KEYS:
                raise errors.UsageError(f"cannot select on {key!r}", f"selector keys: {', '.join(SELECTOR_KEYS)}")
            out.append((key, op != "!=", value))
    return out


def selected(m: dict[str, Any], selector: list[Requirement]) -> bool:
    return all((str(SELECTOR_KEYS[k](m) or "") == v) == equal for k, equal, v in selector)


filter_options = [
    click.option("--state", type=click.Choice([s.value for s in STORED_STATES]), help="Only machines in this state."),
    click.option("--role", type=click.Choice(ROLE_NAMES), help="Only machines with this role."),
    click.option("--os", "os_", type=click.Choice(OS_NAMES), help="Only machines with this OS."),
    click.option("-l", "--selector", multiple=True, metavar="KEY=VALUE",
                 help=f"Only machines matching KEY=VALUE or KEY!=VALUE, comma-separated, repeatable; keys: "
                      f"{', '.join(SELECTOR_KEYS)} (labd's servers: also cloud, environment, bastion and any "
                      f"label; other labd resources: their list filters)."),
]
labd_filter_options = [
    click.option("--cloud", help="labd: only what belongs to this cloud."),
    click.option("--env", "environment", metavar="ENVIRONMENT", help="labd: only what belongs to this environment."),
]


def with_filters(f):
    for opt in reversed(filter_options):
        f = opt(f)
    return f


def list_machines(obj: Ctx, name: str | None, filters: dict[str, Any], watch: bool, watch_timeout: float,
                  interval: float, selector: tuple[str, ...] = ()) -> None:
    """List (or show one machine), then optionally watch the event cursor and print what changes."""
    wanted = parse_selector(selector)
    if name and wanted:
        raise errors.UsageError("name a machine or select with -l, not both")
    client, fmt = obj.client, obj.output
    cursor = client.last_event_id() if watch else 0
    if name:
        one = targets.resolve(client.machines(), name)
        output.machine(one, fmt)
    else:
        found = [m for m in client.machines(**{k: v for k, v in filters.items() if v}) if selected(m, wanted)]
        if found or fmt in ("json", "yaml"):
            output.machines(found, fmt)
        else:  # as kubectl's "No resources found", on stderr: stdout stays empty for scripts
            click.echo("No machines found.", err=True)
    if watch:
        watch_machines(obj, cursor, one["mac"] if name else None, filters, watch_timeout, interval, wanted)


def _wanted(m: dict[str, Any], filters: dict[str, Any], selector: list[Requirement]) -> bool:
    return m["state"] == "removed" or (all(m.get(k) == v for k, v in filters.items() if v) and selected(m, selector))


def watch_machines(obj: Ctx, cursor: int, mac: str | None, filters: dict[str, Any], timeout: float,
                   interval: float, selector: list[Requirement] | None = None) -> None:
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
                if not _wanted(m, filters, selector or []):
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
@click.argument("resource", type=click.Choice(sorted({*RESOURCES, *fleet.ALIASES})), metavar="RESOURCE")
@click.argument("name", required=False, shell_complete=complete_machines)
@with_filters
@labd_filter_options[0]
@labd_filter_options[1]
@output_option
@watch_options
@pass_ctx
def get(obj: Ctx, resource: str, name: str | None, state, role, os_, selector, cloud, environment, watch,
        watch_timeout, interval) -> None:
    """List machines (those -l selects), or show the one NAME (a host name, MAC or IP).

    With a labd (labctl login): servers, bastions, agents, clusters, users, roles, rolebindings,
    tokens or audit; NAME shows one.
    """
    if resource in fleet.ALIASES:
        if watch:
            raise errors.UsageError("--watch follows a bastion's machines; labd's resources have no watch yet")
        flags = {"state": state, "role": role, "os": os_, "cloud": cloud, "environment": environment}
        fleet.get(obj, resource, name, parse_selector(selector, any_key=True), flags)
        return
    if cloud or environment:
        raise errors.UsageError("--cloud and --env select labd's resources (labctl get servers)")
    list_machines(obj, name, {"state": state, "role": role, "os": os_}, watch, watch_timeout, interval, selector)
