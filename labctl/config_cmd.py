"""`labctl config list|get|set|path` and kubectl's context commands (`get-contexts`,
`current-context`, `use-context`, `set-context`, `delete-context`): the settings file
(~/.labctl/config.yaml, mode 0600)."""

from __future__ import annotations

import os

import click

from labctl import config as cfgmod
from labctl import errors, output
from labctl.context import Ctx, complete_contexts, output_option, pass_ctx


@click.group()
def config() -> None:
    """Show and change labctl's settings (bastionUrl, labdUrl, token, output) and contexts."""


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
    doc = {r["key"]: (s[r["key"]] if show_token else r["value"]) for r in rows}
    if s.context:
        rows.insert(0, {"key": "context", "value": s.context, "source": cfgmod.selected_context(
            cfgmod.read_doc(), obj.flags.get("context"), os.environ)[1]})
        doc = {"context": s.context, **doc}
    output.emit(doc, obj.output,
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
@pass_ctx
def set_cmd(obj: Ctx, key: str, value: str) -> None:
    """Store KEY=VALUE in the settings file (created with mode 0600), in the selected context if
    there is one (--context, LABCTL_CONTEXT or current-context), else at the top level. An empty
    VALUE removes KEY.

    A VALUE that begins with '-' (a token may) is taken as the value, not as an option.
    """
    doc = cfgmod.read_doc()
    name, _ = cfgmod.selected_context(doc, obj.flags.get("context"), os.environ)
    values = doc.context(name) if name else doc.values
    value = cfgmod.check_value(key, value) if value.strip() else ""
    if value:
        values[key] = value
    else:
        values.pop(key, None)
    p = cfgmod.write_doc(doc)
    click.echo(f"{key} {'set' if value else 'removed'}{f' in context {name}' if name else ''} in {p}")


# -- contexts, as kubectl's `config` has them ---------------------------------------------------------
@config.command("get-contexts")
@output_option
@pass_ctx
def get_contexts(obj: Ctx) -> None:
    """List the contexts (bastions and labd instances) of the settings file; * marks the current one."""
    doc = cfgmod.read_doc()
    rows = [{"name": n, "current": n == doc.current, "bastionUrl": c.get("bastionUrl", ""),
             "labdUrl": c.get("labdUrl", ""), "token": bool(c.get("token"))} for n, c in sorted(doc.contexts.items())]
    if obj.output in ("json", "yaml"):
        output.emit({"current-context": doc.current, "contexts": rows}, obj.output, lambda: None)
    elif not rows:
        click.echo(f"No contexts in {cfgmod.path()}: add one with labctl config set-context NAME --bastion URL --token TOKEN",
                   err=True)
    else:
        output.print_table(rows, [("CURRENT", lambda r: "*" if r["current"] else ""), ("NAME", lambda r: r["name"]),
                                  ("BASTION", lambda r: r["bastionUrl"]), ("LABD", lambda r: r["labdUrl"]),
                                  ("TOKEN", lambda r: "set" if r["token"] else "")])


@config.command("current-context")
def current_context() -> None:
    """Print the current context's name."""
    doc = cfgmod.read_doc()
    if not doc.current:
        raise errors.UsageError(f"current-context is not set in {cfgmod.path()}", "labctl config use-context NAME")
    click.echo(doc.current)


@config.command("use-context")
@click.argument("name", shell_complete=complete_contexts)
def use_context(name: str) -> None:
    """Make NAME the current context (every command then talks to its bastion)."""
    doc = cfgmod.read_doc()
    doc.context(cfgmod.check_context_name(name))
    doc.current = name
    cfgmod.write_doc(doc)
    click.echo(f'Switched to context "{name}".')


@config.command("set-context")
@click.argument("name", shell_complete=complete_contexts)
@click.option("--bastion", "bastion_url", metavar="URL", help="The bastion's URL (bastionUrl).")
@click.option("--labd", "labd_url", metavar="URL", help="A labd's URL (labdUrl).")
@click.option("--token", metavar="TOKEN", help="The operator token (lab-bastion token).")
@click.option("--output", "output_", type=click.Choice(cfgmod.OUTPUTS), help="Output format under this context.")
@click.option("--use", is_flag=True, help="Also make it the current context.")
def set_context(name: str, bastion_url, labd_url, token, output_, use) -> None:
    """Create context NAME or change the settings given; the others stay as they are."""
    doc = cfgmod.read_doc()
    values = doc.contexts.setdefault(cfgmod.check_context_name(name), {})
    created = not values
    for key, value in (("bastionUrl", bastion_url), ("labdUrl", labd_url), ("token", token), ("output", output_)):
        if value is not None:
            if value.strip():
                values[key] = cfgmod.check_value(key, value)
            else:
                values.pop(key, None)
    if use:
        doc.current = name
    p = cfgmod.write_doc(doc)
    click.echo(f'Context "{name}" {"created" if created else "modified"} in {p}{" and made current" if use else ""}.')


@config.command("delete-context")
@click.argument("name", shell_complete=complete_contexts)
def delete_context(name: str) -> None:
    """Remove context NAME (if it is the current one, no context is current afterwards)."""
    doc = cfgmod.read_doc()
    doc.context(cfgmod.check_context_name(name))
    del doc.contexts[name]
    if doc.current == name:
        doc.current = ""
    p = cfgmod.write_doc(doc)
    click.echo(f'Deleted context "{name}" from {p}.')


@config.command("path")
def path_cmd() -> None:
    """Print the settings file's path ($LABCTL_CONFIG, else ~/.labctl/config.yaml)."""
    click.echo(str(cfgmod.path()))
