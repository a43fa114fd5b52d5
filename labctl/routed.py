"""`labctl provision install|reprovision|cancel|forget|debug` through labd (docs/labd-link.md).

With a labd context (labctl login to a labd, no bastion named), a provisioning command goes to
labd, which finds the bastion that holds the machine (``--bastion NAME`` when two do), sends the
command over that bastion's link and answers the bastion's answer unchanged. A bastion that is
offline refuses the command ("bastion X offline since T") unless ``--queue`` is given: it is then
delivered when the bastion reconnects."""

from __future__ import annotations

import urllib.parse
from typing import Any

import click

from labctl import errors, output

bastion_option = click.option("--bastion", "via_bastion", metavar="NAME", help="With a labd: the bastion to send the "
                              "command to, when the machine is seen by several.")
queue_option = click.option("--queue", "queue", is_flag=True, help="With a labd: if the bastion is offline, deliver the "
                            "command when it reconnects (instead of refusing it).")


def options(fn):
    return bastion_option(queue_option(fn))


def check(obj, via_bastion: str | None, queue: bool) -> bool:
    """True when the command goes through labd; --bastion/--queue without a labd are usage errors."""
    if obj.uses_labd:  # the context names a labd and no bastion
        return True
    if via_bastion or queue:
        raise errors.UsageError("--bastion and --queue route a command through labd, and this context names a bastion",
                                "labctl login https://LABD:PORT, or leave them out")
    return False


def send(obj, target: str, action: str, body: dict[str, Any], via_bastion: str | None, queue: bool) -> dict:
    """POST /api/v1/servers/<target>/<action> to labd; the bastion's answer (or labd's 202 when queued)."""
    payload = {**body, **({"bastion": via_bastion} if via_bastion else {}), **({"queue": True} if queue else {})}
    return obj.labd.post(f"/api/v1/servers/{urllib.parse.quote(target, safe='')}/{action}", payload)


def report(obj, result: dict, target: str, done: str) -> None:
    """Print the answer: the queued command when the bastion was offline, else what was done."""
    if isinstance(result, dict) and result.get("command") and result.get("state") == "queued":
        output.emit(result, obj.output, lambda: click.echo(
            f"{target}: bastion {result.get('bastion')} is offline; command {result['command']} is queued and "
            "delivered when it reconnects"))
        return
    output.emit(result, obj.output, lambda: click.echo(f"{target}: {done}"))
