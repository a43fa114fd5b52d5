"""lab-agent's command line: `join` (enroll once) and `run` (the daemon, under systemd)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

import click

from lab_agent import VERSION, facts

DEFAULT_STATE = "/var/lib/lab-agent"
EXIT_REFUSED = 78  # EX_CONFIG: labd refuses this identity (revoked, expired certificate): join again
state_option = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE,
                            show_default=True, envvar="LAB_AGENT_STATE_DIR",
                            help="Where the identity (key, certificate, labd's CA) lives (0700). Env: LAB_AGENT_STATE_DIR.")


@click.group()
@click.version_option(VERSION, prog_name="lab-agent")
def main():
    """lab-agent: heartbeat, remote commands and the journal of this machine, for labd (docs/agent.md)."""


@main.command()
@click.option("--labd", "labd_url", required=True, metavar="URL", envvar="LAB_AGENT_LABD",
              help="labd's API, e.g. https://labd.example:8443. Env: LAB_AGENT_LABD.")
@click.option("--token", required=True, metavar="TOKEN", envvar="LAB_AGENT_TOKEN",
              help="A join token of kind agent (`labctl create token --kind agent`), with labd's CA pin. "
                   "Env: LAB_AGENT_TOKEN (keeps it out of the process list).")
@click.option("--name", default=None, help="This host's name in labd (default: the host name).")
@click.option("--force", is_flag=True, help="Enroll again even if an identity exists (a new key and certificate).")
@state_option
def join(labd_url, token, name, force, state_dir):
    """Enroll with labd: make a key here (it never leaves this host), send a CSR with the token,
    store the certificate labd's CA signed. A token scoped to this machine is accepted at once; a
    reusable or unscoped one leaves the agent pending until `labctl agent approve`."""
    from labcore import enroll

    if enroll.has_identity(state_dir) and not force:
        meta = enroll.load_meta(state_dir)
        raise click.ClickException(f"already enrolled as {meta.get('id')} in {state_dir}; --force to enroll again")
    name = name or socket.gethostname()
    try:
        beat = facts.Sampler().sample()
        answer = enroll.enroll(labd_url, token, "agent", name, {k: str(beat[k]) for k in ("hostname", "os", "kernel", "version")})
    except enroll.EnrollError as exc:
        raise click.ClickException(str(exc)) from None
    enroll.store_identity(state_dir, answer["key"], answer["certificate"], answer["ca"],
                          {"id": answer["id"], "kind": "agent", "name": name, "hub": answer["hub"], "labd": labd_url})
    click.echo(f"lab-agent: enrolled as {answer['id']} ({answer['status']}); certificate valid until "
               f"{answer['expires_at']}" + ("; waiting for `labctl agent approve`" if answer["status"] == "pending" else ""))


@main.command()
@state_option
@click.option("--exec-user", default="nobody", show_default=True, envvar="LAB_AGENT_EXEC_USER",
              help="The account remote commands run as (never chosen by the caller). Env: LAB_AGENT_EXEC_USER.")
@click.option("--heartbeat-seconds", type=float, default=15.0, show_default=True, envvar="LAB_AGENT_HEARTBEAT_SECONDS")
@click.option("--journalctl", default="journalctl", show_default=True, help="The journalctl program (tests: a fake).")
@click.option("--renew-check-seconds", type=float, default=30.0, show_default=True,
              help="How often the certificate's age is checked (renewal at about 2/3 of its life).")
@click.option("--backoff-cap", type=float, default=30.0, show_default=True, help="Longest wait between reconnects (s).")
def run(state_dir, exec_user, heartbeat_seconds, journalctl, renew_check_seconds, backoff_cap):
    """The daemon: keep the link to labd's hub up, beat, run commands, relay the journal."""
    from lab_agent.daemon import Agent, Settings
    from labcore import enroll

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if not enroll.has_identity(state_dir):
        raise click.ClickException(f"no identity in {state_dir}: run `lab-agent join --labd URL --token T` first")
    agent = Agent(Settings(state_dir, exec_user, heartbeat_seconds, journalctl, renew_check_seconds, backoff_cap))
    asyncio.run(agent.run())
    if agent.link.last_error:  # a refusal retrying cannot fix (revoked, expired): systemd does not restart on 78
        click.echo(f"lab-agent: {agent.link.last_error}", err=True)
        sys.exit(EXIT_REFUSED)
