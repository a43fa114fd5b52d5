"""`labctl provision install|reprovision|cancel|forget|debug` through labd (docs/labd-link.md).

With a labd context (labctl login to a labd, no bastion named), a provisioning command goes to
labd, which finds the bastion that holds the machine (``--bastion NAME`` when two do), sends the
command over that bastion's link and answers the bastion's answer unchanged. A bastion that is
offline refuses the command ("bastion X offline since T") unless ``--queue`` is given: it is then
delivered when the bastion reconnects.

`labctl provision logs TARGET [-f]` with a labd context: the log stays on the bastion; labd sends
it a logs command and labctl follows the command's output rows (labctl/remote.py), shown as
against the bastion itself."""

from __future__ import annotations

import sys
import urllib.parse
from typing import Any

import click

from labctl import errors, follow, output, remote

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


def _failed(obj, c: dict, target: str) -> None:
    """Raise the bastion's error when the logs command failed (its answer, relayed unchanged)."""
    if c["state"] == "cancelled":
        sys.exit(130)
    r = c.get("result") or {}
    status, body = int(r.get("status") or 502), r.get("body")
    if c["state"] == "failed" or status >= 400:
        body = body if isinstance(body, dict) and "error" in body else {"error": str(body)[:200]}
        raise obj.labd.answer_error(status, body, f"logs of {target} on its bastion")


def logs(obj, target: str, follow_: bool, tail: int, via_bastion: str | None) -> None:
    """`labctl provision logs` through labd: the last ``tail`` lines, or with ``follow_`` the live
    progress view until the install ends (exit 7 when it failed or stalled; Ctrl-C stops the
    bastion's follow)."""
    made = send(obj, target, "logs", {"tail": tail, "follow": follow_}, via_bastion, False)
    name = target
    if not follow_:
        lines: list[dict] = []
        c = remote.follow(obj.labd, made["command"], lambda row: lines.append(row["data"]) if row["stream"] == "log" else None)
        _failed(obj, c, target)
        doc = {"mac": made["mac"], "bastion": made["bastion"], "state": ((c.get("result") or {}).get("body") or {}).get("state"),
               "lines": lines}
        output.emit(doc, obj.output, lambda: [click.echo(f"{r.get('ts', '')} {r.get('text', '')}") for r in lines])
        return
    end: list[str] = []
    with follow.ProgressView(name) as view:
        def on_row(row: dict) -> None:
            data = row["data"] if isinstance(row["data"], dict) else {"line": str(row["data"])}
            state = follow.show_event(view, row["stream"], data, name)
            if state is not None:
                end.append(state)
        c = remote.follow(obj.labd, made["command"], on_row)
    _failed(obj, c, target)
    if not end:
        raise errors.InstallFailed(f"{name}: the bastion stopped following the install before it ended",
                                   "labctl provision logs -f NAME again")
    click.echo(f"{name} installed")
