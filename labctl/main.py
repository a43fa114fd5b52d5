"""`labctl`: the operator CLI. The root group lives here; every command group has its own module
and is registered below, one line each."""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from labctl import errors, output
from labctl.context import Ctx, complete_contexts

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: Command groups, one per line: name -> "module:attribute" (imported only when used).
COMMANDS = {
    "config": "labctl.config_cmd:config",
    "provision": "labctl.provision:provision",
    "get": "labctl.get:get",
    "describe": "labctl.describe:describe",
    "delete": "labctl.delete:delete",
    "doctor": "labctl.doctor:doctor",
    "roles": "labctl.roles:roles",
    "completion": "labctl.completion:completion",
    "init": "labctl.init_cmd:init",
    "app": "labctl.app_k3s:app",
    "power": "labctl.power:power",
    "login": "labctl.login:login",
    "logout": "labctl.login:logout",
    "create": "labctl.fleet:create",
    "agent": "labctl.agent_cmd:agent",
    "exec": "labctl.agent_cmd:exec_",
    "logs": "labctl.agent_cmd:logs",
}


class LabctlGroup(click.Group):
    """Loads the command groups of COMMANDS lazily, and turns every LabctlError into one clean line
    and its exit code; tracebacks only with --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str):
        if name in COMMANDS:
            module, _, attr = COMMANDS[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except errors.LabctlError as exc:
            if _debug(ctx):
                traceback.print_exc()
            output.error(exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            output.error("interrupted")
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that hides a traceback
            if _debug(ctx):
                traceback.print_exc()
            output.error(f"unexpected error: {type(exc).__name__}: {exc}", "rerun with --debug for the traceback")
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    obj = ctx.find_object(Ctx)
    return bool(obj and obj.debug)


@click.group(cls=LabctlGroup, context_settings=CONTEXT)
@click.option("--context", metavar="NAME", shell_complete=complete_contexts, help="Use this context of the settings file (default: env LABCTL_CONTEXT, "
              "else current-context; see labctl config get-contexts).")
@click.option("--bastion", metavar="URL", help="Bastion URL (default: bastionUrl setting, env LABCTL_BASTION_URL).")
@click.option("--token", metavar="TOKEN", help="Operator token (default: token setting, env LABCTL_TOKEN).")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json", "yaml"]),
              help="Output format for every command (env LABCTL_OUTPUT).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="lab-platform", prog_name="labctl")
@click.pass_context
def cli(ctx: click.Context, context, bastion, token, output, debug):
    """Operate lab-platform bastions: discover, install and reprovision bare-metal machines."""
    ctx.obj = Ctx(bastion=bastion, token=token, output=output, debug=debug, context=context)


def main() -> None:
    """Console script entry point."""
    try:
        cli.main(prog_name="labctl")
    except KeyboardInterrupt:
        output.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
