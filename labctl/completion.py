"""`labctl completion bash|zsh|fish`: the shell completion script (also in contrib/completions/)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")
#: packaging file name per shell (contrib/completions/)
FILES = {"bash": "labctl", "zsh": "_labctl", "fish": "labctl.fish"}


def script(shell: str) -> str:
    from labctl.main import cli

    cls = get_completion_class(shell)
    return cls(cli, {}, "labctl", "_LABCTL_COMPLETE").source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  labctl completion bash > /etc/bash_completion.d/labctl
    zsh:   labctl completion zsh > "${fpath[1]}/_labctl"
    fish:  labctl completion fish > ~/.config/fish/completions/labctl.fish
    """
    click.echo(script(shell), nl=False)
