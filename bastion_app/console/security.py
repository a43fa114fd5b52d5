"""The console's security: the login session, CSRF tokens and the response headers.

- **Login.** The operator pastes the bastion's operator token (the one ``/api`` takes as a bearer
  token); the answer is a session cookie signed with a key of its own in the data directory
  (``console-session.key``, 0600, made by :func:`labcore.secretbox.load_or_create_key`). The
  session holds an HMAC of the operator token, so a new token (delete ``<data dir>/token`` and
  restart) ends every session. The cookie is HttpOnly, SameSite=Strict, limited to ``/console`` and Secure
  when the request came over TLS. A wrong token is a 4xx, so it spends the source's error budget
  (:mod:`bastion_app.limits`): guessing is slowed down like any other bad request.
- **CSRF.** Each session has a random token; every POST must send it back in the form field
  ``csrf`` (compared in constant time), else 403 and nothing changes.
- **Headers.** A strict Content-Security-Policy (only this origin's own files: no inline script or
  style, no frames), ``X-Frame-Options: DENY``, ``nosniff``, no referrer leaving the origin, and
  pages are never cached.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import timedelta

from flask import Flask, current_app, request, session
from flask.sessions import SecureCookieSessionInterface

from labcore import secretbox

#: the session key's file in the data directory
KEY_NAME = "console-session.key"
#: how long a login lasts
SESSION_HOURS = 12
COOKIE = "lab_console"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _Sessions(SecureCookieSessionInterface):
    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or super().get_cookie_secure(app)


def init_app(app: Flask, data_dir) -> None:
    """Session cookies for ``app``, signed with the key in ``data_dir`` (labd's console uses the
    same: one home for the session, CSRF and header rules)."""
    app.secret_key = secretbox.load_or_create_key(data_dir / KEY_NAME)
    app.config.update(SESSION_COOKIE_NAME=COOKIE, SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_PATH="/console", PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS))
    app.session_interface = _Sessions()


def _operator_mark(token: str) -> str:
    """What the session keeps of the operator token: an HMAC under the session key."""
    return hmac.new(current_app.secret_key, b"operator:" + token.encode(), hashlib.sha256).hexdigest()


def token_ok(given: str) -> bool:
    return secrets.compare_digest(given.strip().encode(), current_app.config["LAB_TOKEN"].encode())


def log_in() -> None:
    session.clear()
    session.permanent = True
    session["op"] = _operator_mark(current_app.config["LAB_TOKEN"])
    session["since"] = int(time.time())
    session["csrf"] = secrets.token_urlsafe(32)


def logged_in() -> bool:
    mark = session.get("op")
    return isinstance(mark, str) and secrets.compare_digest(mark, _operator_mark(current_app.config["LAB_TOKEN"]))


def csrf_token() -> str:
    """This session's CSRF token (made on first use, also before login: the login form has one)."""
    if not isinstance(session.get("csrf"), str):
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_ok() -> bool:
    expected, given = session.get("csrf"), request.form.get("csrf", "")
    return isinstance(expected, str) and secrets.compare_digest(expected.encode(), given.encode())


def harden(resp):
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    if "Cache-Control" not in resp.headers:
        resp.headers["Cache-Control"] = "no-store"
    return resp
