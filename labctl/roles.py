"""`labctl roles`: what each role installs (the role table, :data:`labcore.domain.ROLES`)."""

from __future__ import annotations

import click

from labcore import domain
from labctl import output
from labctl.context import Ctx, output_option, pass_ctx


@click.command()
@output_option
@pass_ctx
def roles(obj: Ctx) -> None:
    """List the machine roles and what each installs."""
    rows = [{"role": r.name, "summary": r.summary, "installs": list(r.installs)} for r in domain.ROLES]
    output.emit({"roles": rows}, obj.output,
                lambda: output.print_table(rows, [("ROLE", lambda r: r["role"]), ("SUMMARY", lambda r: r["summary"])]
                                           + ([("INSTALLS", lambda r: ", ".join(r["installs"]))] if obj.output == "wide" else [])))
