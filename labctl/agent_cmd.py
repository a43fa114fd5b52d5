"""labctl's lab-agent commands, against labd: `agent approve|revoke`, `exec HOST -- CMD...` and
`logs HOST` (docs/agent.md).

A command is created with one request and then followed by polling its output
(labctl/remote.py). Ctrl-C cancels the remote command (labd has the agent kill its process group)
before labctl exits with 130.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any
from urllib.parse import quote

import click

from labctl import errors, remote
from labctl.context import Ctx

TIMEOUT_EXIT = remote.TIMEOUT_EXIT
#: how long after --timeout labctl waits for the agent's own answer before giving up
TIMEOUT_MARGIN = 15.0


def _agent_path(host: str) -> str:
    return f"/api/v1/agents/{quote(host, safe='')}"


def printer(out: IO[str], err: IO[str]):
    """An agent command's output rows as text: stdout to ``out``, stderr to ``err``, journal
    entries as lines."""
    def on_row(row: dict) -> None:
        if row["stream"] == "journal":
            e = row["data"]
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time_us", 0) / 1e6))
            out.write(f"{stamp} {e.get('unit', '')}: {e.get('message', '')}\n")
            out.flush()
        else:
            stream = err if row["stream"] == "stderr" else out
            stream.write(row["data"])
            stream.flush()
    return on_row


def follow(client: Any, cid: str, out: IO[str], err: IO[str], *, deadline: float | None = None,
           poll: float = remote.POLL_SECONDS) -> dict:
    """Print an agent command's output until it ends (:func:`labctl.remote.follow`)."""
    return remote.follow(client, cid, printer(out, err), deadline=deadline, poll=poll)


def exit_code(c: dict) -> int:
    """The remote command's exit code as labctl's: its own code, 124 on --timeout, 128+N for a signal."""
    r = c.get("result") or {}
    if c["state"] == "cancelled":
        return 130
    if r.get("timed_out"):
        return TIMEOUT_EXIT
    if r.get("exit_code") is not None:
        return int(r["exit_code"])
    if r.get("signal"):
        return 128 + int(r["signal"])
    return 1


@click.group()
def agent() -> None:
    """Approve or revoke lab-agents (list them with labctl get agents)."""


@agent.command()
@click.argument("host")
@click.pass_obj
def approve(obj: Ctx, host: str) -> None:
    """Accept a pending agent (one that joined with a reusable or unscoped token)."""
    a = obj.labd.post(_agent_path(host) + "/approve")
    click.echo(f"agent {a['hostname']} approved ({a['id']})")


@agent.command()
@click.argument("host")
@click.pass_obj
def revoke(obj: Ctx, host: str) -> None:
    """Revoke an agent: its certificates are refused from now on and its link is closed; it must
    join again with a new token."""
    a = obj.labd.post(_agent_path(host) + "/revoke")
    click.echo(f"agent {a['hostname']} revoked ({a['id']})")


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--timeout", type=click.FloatRange(min=0.1, max=86400), help="Kill the command after SECONDS (exit 124).")
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(obj: Ctx, timeout: float | None, host: str, argv: tuple[str, ...]) -> None:
    """Run a command on HOST through its lab-agent: labctl exec HOST -- CMD ARGS...

    The command runs as the agent's exec user (not root unless configured), without a shell;
    stdout and stderr arrive in order and labctl exits with the command's exit code (124 after
    --timeout, 128+N when killed by signal N, 130 after Ctrl-C, which kills the remote process).
    Needs permission `exec` on the host's scope; every exec is audited (argv, user, exit code)."""
    client = obj.labd
    body: dict[str, Any] = {"argv": list(argv)}
    if timeout:
        body["timeout"] = timeout
    made = client.post(_agent_path(host) + "/exec", body)
    deadline = time.monotonic() + timeout + TIMEOUT_MARGIN if timeout else None
    c = follow(client, made["id"], sys.stdout, sys.stderr, deadline=deadline)
    r = c.get("result") or {}
    if c["state"] == "failed" and r.get("error"):
        raise errors.LabctlError(f"exec on {host} failed: {r['error']}")
    sys.exit(exit_code(c))


@click.command()
@click.argument("host")
@click.option("-u", "--unit", help="Only this systemd unit.")
@click.option("-f", "--follow", "follow_", is_flag=True, help="Keep printing new entries (Ctrl-C stops).")
@click.option("--since", help="journalctl's --since (e.g. '-1h', 'today', '2026-01-01 10:00').")
@click.option("-n", "--lines", type=click.IntRange(1, 100000), help="The last N entries (default 200 without --since).")
@click.pass_obj
def logs(obj: Ctx, host: str, unit: str | None, follow_: bool, since: str | None, lines: int | None) -> None:
    """Print HOST's journal through its lab-agent (needs permission `exec` on the host's scope).
    A follow survives reconnects of the agent: it resumes after the last entry printed."""
    client = obj.labd
    body = {k: v for k, v in {"unit": unit, "since": since, "follow": follow_, "lines": lines}.items() if v}
    made = client.post(_agent_path(host) + "/logs", body)
    try:
        c = follow(client, made["id"], sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        sys.exit(0 if follow_ else 130)
    r = c.get("result") or {}
    if c["state"] == "failed":
        raise errors.LabctlError(f"logs of {host} failed: {r.get('error') or 'journalctl exited with ' + str(r.get('exit_code'))}")
