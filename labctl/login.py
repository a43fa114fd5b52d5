"""`labctl login URL` and `labctl logout`: an API token from labd, kept in a context of the settings
file (mode 0600), and labd's CA pinned on first login, as SSH pins a host key.

The CA certificate (GET /api/v1/ca, fetched once without verification) is shown by its SHA-256
fingerprint; once trusted it is stored as ``ca/<context>.pem`` beside the settings file and every
later request to that labd verifies TLS with it (and only with it).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import sys
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import click
import urllib3

from labctl import config, errors
from labctl.client import Client
from labctl.context import Ctx, pass_ctx

_FINGERPRINT = re.compile(r"(?i)^(?:sha256:)?((?:[0-9a-f]{2}:?){31}[0-9a-f]{2})$")


def fingerprint(pem: str) -> str:
    """``sha256:<hex>`` of the certificate's DER bytes (what ``openssl x509 -fingerprint -sha256`` shows,
    without the colons)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")
    except ValueError:
        raise errors.Unreachable("the CA certificate labd sent is not a PEM certificate",
                                 "check the URL: GET /api/v1/ca of a labd answers its CA certificate") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_fingerprint(value: str) -> str:
    """``sha256:HEX`` (64 hex digits, colons and case as you like) normalised as fingerprint() prints it."""
    m = _FINGERPRINT.match(value.strip())
    if not m:
        raise errors.UsageError(f"--ca-fingerprint {value!r} is not a SHA-256 fingerprint",
                                "sha256: and 64 hex digits, as `labctl login` prints it")
    return "sha256:" + m.group(1).replace(":", "").lower()


def context_name(url: str) -> str:
    """The default context of a labd: its host name (characters a context name cannot hold become '-')."""
    host = urlsplit(url).hostname or "labd"
    return config.check_context_name(re.sub(r"[^A-Za-z0-9._@-]", "-", host).strip("-._@")[:63] or "labd")


def pin_ca(url: str, pinned: Path, expected: str | None, can_ask: bool = True) -> Path | None:
    """The CA file to verify ``url`` with: the one pinned before (if ``expected`` does not contradict
    it), else labd's CA fetched now and trusted (by --ca-fingerprint or by the operator's answer),
    written to a temporary file beside ``pinned``; None for plain http."""
    if not url.startswith("https://"):
        return None
    if pinned.exists() and (expected is None or fingerprint(pinned.read_text()) == expected):
        return pinned
    with warnings.catch_warnings():  # the one unverified request: the CA itself, checked by its fingerprint
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        pem = Client(url, labd=True, verify=False).text("/api/v1/ca")
    got = fingerprint(pem)
    if expected is not None:
        if got != expected:
            raise errors.Unauthorized(
                f"labd's CA certificate at {url} has fingerprint {got}, not the expected {expected}: refusing to trust it",
                "someone may be intercepting the connection, or labd was re-initialised: check the fingerprint "
                "on the labd host (openssl x509 -noout -fingerprint -sha256 -in DATA_DIR/ca.crt)")
    else:
        hint = f"check it on the labd host, then pass --ca-fingerprint {got}"
        if not can_ask:
            raise errors.UsageError(f"labd's CA certificate ({got}) is not trusted yet and stdin carries the password", hint)
        click.echo(f"labd at {url} presents the CA certificate\n  {got}", err=True)
        if not click.confirm("Trust it for this labd (it is stored and checked on every connection)?", err=True):
            raise errors.Unauthorized("labd's CA certificate was not trusted; nothing stored", hint)
    pinned.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".ca-", suffix=".pem", dir=pinned.parent)
    with os.fdopen(fd, "w") as f:
        f.write(pem.strip() + "\n")
    return Path(tmp)


@click.command()
@click.argument("url")
@click.option("--username", "-u", metavar="NAME", help="labd user (prompted for if not given).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin (for scripts).")
@click.option("--token", "api_token", metavar="TOKEN",
              help="An API token of labd to store instead of logging in with a password (env LABCTL_LOGIN_TOKEN).",
              envvar="LABCTL_LOGIN_TOKEN")
@click.option("--context", "context", metavar="NAME", help="Context to store the login in (default: the URL's host name).")
@click.option("--ca-fingerprint", metavar="sha256:HEX",
              help="Trust labd's CA only if it has this fingerprint, without asking (refused on a mismatch).")
@pass_ctx
def login(obj: Ctx, url: str, username, password_stdin, api_token, context, ca_fingerprint) -> None:
    """Log in to the labd at URL and store its API token in a context (made the current one).

    On the first login labd's CA certificate is shown by its SHA-256 fingerprint and stored once
    trusted; TLS to that labd is then verified with it. The password is prompted for (hidden), or read
    from stdin with --password-stdin; --token stores an existing API token instead.
    """
    url = config.check_value("labdUrl", url)
    if not url:
        raise errors.UsageError("URL is empty", "e.g. labctl login https://labd.lab:8443")
    name = config.check_context_name(context or obj.flags.get("context") or context_name(url))
    expected = parse_fingerprint(ca_fingerprint) if ca_fingerprint else None
    pinned = config.ca_path(name)
    ca = pin_ca(url, pinned, expected, can_ask=not password_stdin)
    try:
        client = Client(url, labd=True, verify=str(ca) if ca else True)
        if api_token:
            token = config.check_value("token", api_token)
            who = Client(url, token, labd=True, verify=client.verify).get("/api/v1/whoami")
            user = who.get("user")
        else:
            username = username or click.prompt("Username", err=True)
            if password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            else:
                password = click.prompt("Password", hide_input=True, err=True)
            answer = client.post("/api/v1/login", {"username": username, "password": password})
            token, user = config.check_value("token", str(answer.get("token") or "")), answer.get("user")
            if not token:
                raise errors.Unreachable(f"{url} answered the login without a token", "is it a labd?")
        if ca and ca != pinned:
            os.replace(ca, pinned)
    finally:
        if ca and ca != pinned and ca.exists():
            ca.unlink()
    doc = config.read_doc()
    values = doc.contexts.setdefault(name, {})
    values.update(labdUrl=url, token=token)
    values.pop("bastionUrl", None)
    doc.current = name
    where = config.write_doc(doc)
    who = user.get("username") or user.get("name") if isinstance(user, dict) else user
    click.echo(f"Logged in to {url} as {who or '?'}; context {name} (current) in {where}")


@click.command()
@pass_ctx
def logout(obj: Ctx) -> None:
    """Revoke the API token at labd and remove it from the selected context."""
    s = obj.settings
    if not s["token"]:
        raise errors.UsageError("not logged in: no token", "labctl login URL")
    try:
        obj.labd.post("/api/v1/logout")
    except errors.Unauthorized:
        pass  # expired or revoked already: forgetting it is all that is left
    doc = config.read_doc()
    if s.context and doc.contexts.get(s.context, {}).pop("token", None):
        config.write_doc(doc)
        click.echo(f"Logged out of {s['labdUrl']}; token removed from context {s.context}")
    else:
        click.echo(f"Logged out of {s['labdUrl']} (the token came from {s.sources['token']}; nothing stored to remove)")
