"""What every command shares: the settings, the one HTTP client, and the options defined once
(``-o``, ``--watch``) that command modules attach by name."""

from __future__ import annotations

from functools import cached_property

import click

from labctl import config, errors
from labctl.client import Client


class Ctx:
    """``ctx.obj`` of every labctl command."""

    def __init__(self, bastion: str | None = None, token: str | None = None, output: str | None = None,
                 debug: bool = False, context: str | None = None):
        self.flags: dict[str, str | None] = {"bastionUrl": bastion, "token": token, "output": output,
                                             "context": context}
        self.debug = debug

    @cached_property
    def settings(self) -> config.Settings:
        return config.load(self.flags)

    @property
    def output(self) -> str:
        return self.settings["output"]

    @property
    def uses_labd(self) -> bool:
        """A labd is configured (labdUrl) and no bastion was named (bastionUrl is the default)."""
        s = self.settings
        return bool(s["labdUrl"]) and s.sources["bastionUrl"] == "default"

    @cached_property
    def client(self) -> Client:
        s = self.settings
        if self.uses_labd:
            raise errors.UsageError(
                f"{'context ' + s.context if s.context else 'the configuration'} names a labd ({s['labdUrl']}) "
                "and no bastion; machines are a bastion's (labd has servers: labctl get servers)",
                "labctl config use-context NAME (a bastion's context), or --bastion URL")
        return Client(s["bastionUrl"], s["token"])

    @cached_property
    def labd(self) -> Client:
        """The client of the configured labd, verifying TLS with the CA pinned for the context."""
        s = self.settings
        if not s["labdUrl"]:
            raise errors.UsageError("no labd configured (labdUrl is empty)",
                                    "labctl login https://LABD:PORT (or --context NAME of a labd context)")
        pinned = config.ca_path(s.context) if s.context else None
        return Client(s["labdUrl"], s["token"], labd=True,
                      verify=str(pinned) if pinned and pinned.exists() else True)


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)


def _set_output(ctx: click.Context, _param, value: str | None) -> None:
    if value is not None:
        obj = ctx.ensure_object(Ctx)
        obj.flags["output"] = value
        obj.__dict__.pop("settings", None)


output_option = click.option(
    "-o", "--output", type=click.Choice(config.OUTPUTS), expose_value=False, callback=_set_output,
    is_eager=True, help="Output format (default: the `output` setting, else table). Env: LABCTL_OUTPUT.")

watch_option = click.option("-w", "--watch", is_flag=True, help="After listing, keep printing changes (Ctrl-C stops).")
watch_timeout_option = click.option("--watch-timeout", type=click.FloatRange(0), default=0, show_default=True,
                                    metavar="SECONDS", help="Stop watching after SECONDS (0 = until Ctrl-C).")
interval_option = click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
                               metavar="SECONDS", help="How often --watch polls the bastion's event cursor.")


def watch_options(f):
    return watch_option(watch_timeout_option(interval_option(f)))


def complete_machines(ctx: click.Context, _param, incomplete: str) -> list:
    """Shell completion of TARGET/NAME: the bastion's host names and MACs (nothing if it cannot be
    asked within two seconds)."""
    from click.shell_completion import CompletionItem

    try:
        root = ctx.find_root()
        obj = Ctx(bastion=root.params.get("bastion"), token=root.params.get("token"), context=root.params.get("context"))
        client = Client(obj.settings["bastionUrl"], obj.settings["token"], timeout=2.0)
        machines = client.machines()
    except Exception:  # noqa: BLE001 - completion must never print an error into the shell
        return []
    out = []
    for m in machines:
        for value in (m.get("hostname"), m["mac"]):
            if value and value.startswith(incomplete.lower()):
                out.append(CompletionItem(value, help=f"{m['state']} {m['mac'] if value != m['mac'] else m.get('hostname') or ''}".strip()))
    return out


def complete_contexts(_ctx: click.Context, _param, incomplete: str) -> list[str]:
    """Shell completion of a context name: those of the settings file."""
    try:
        return [n for n in sorted(config.read_doc().contexts) if n.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never print an error into the shell
        return []
