"""`labctl config list|get|set|path`: the settings file (~/.labctl/config.yaml, mode 0600)."""

from __future__ import annotations

import click

from labctl import config as cfgmod
from labctl import output
from labctl.context import Ctx, output_option, pass_ctx


@click.group()
def config() -> None:
    """Show and change labctl's settings (bastionUrl, labdUrl, token, output)."""


def _masked(key: str, value: str, show: bool) -> str:
    if key == "token" and value and not show:
        return value[:4] + "…" + f" ({len(value)} characters; --show-token prints it)"
    return value


@config.command("list")
@output_option
@click.option("--show-token", is_flag=True, help="Print the token in full.")
@pass_ctx
def list_cmd(obj: Ctx, show_token: bool) -> None:
    """Every setting, its effective value and where it comes from (flag, env, file, default)."""
    s = obj.settings
    rows = [{"key": k, "value": _masked(k, s[k], show_token), "source": s.sources[k]} for k in cfgmod.KEYS]
    output.emit({r["key"]: (s[r["key"]] if show_token else r["value"]) for r in rows}, obj.output,
                lambda: output.print_table(rows, [("KEY", lambda r: r["key"]), ("VALUE", lambda r: r["value"]),
                                                  ("SOURCE", lambda r: r["source"])]))


@config.command("get")
@click.argument("key", type=click.Choice(cfgmod.KEYS))
@pass_ctx
def get_cmd(obj: Ctx, key: str) -> None:
    """Print the effective value of KEY (the token in full, for scripts)."""
    click.echo(obj.settings[key])


class _KeyValueCommand(click.Command):
    """`set KEY VALUE`: the word after KEY is always the value, even when it begins with '-'."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if len(args) == 2 and not args[0].startswith("-") and "--" not in args:
            args = [args[0], "--", args[1]]
        return super().parse_args(ctx, args)


@config.command("set", cls=_KeyValueCommand)
@click.argument("key", type=click.Choice(cfgmod.KEYS))
@click.argument("value")
def set_cmd(key: str, value: str) -> None:
    """Store KEY=VALUE in the settings file (created with mode 0600). An empty VALUE removes KEY.

    A VALUE that begins with '-' (a token may) is taken as the value, not as an option.
    """
    values = cfgmod.read_file()
    value = cfgmod.check_value(key, value) if value.strip() else ""
    if value:
        values[key] = value
    else:
        values.pop(key, None)
    p = cfgmod.write_file(values)
    click.echo(f"{key} {'set' if value else 'removed'} in {p}")


@config.command("path")
def path_cmd() -> None:
    """Print the settings file's path ($LABCTL_CONFIG, else ~/.labctl/config.yaml)."""
    click.echo(str(cfgmod.path()))
