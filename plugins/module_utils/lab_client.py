# Copyright: lab-platform contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one HTTP client the lab.platform plugins use to talk to a bastion (or labd).

It needs nothing but the Python standard library and ansible-core (``open_url``), so it runs in
an AWX execution environment without the lab-platform Python package.
"""

from __future__ import annotations

import json
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.urls import open_url

URL_ENV = "LAB_BASTION_URL"
TOKEN_ENV = "LAB_BASTION_TOKEN"
USER_AGENT = "lab.platform-ansible"


def lab_argument_spec():
    """Connection options shared by every lab.platform module (documented in doc_fragments/bastion.py)."""
    return dict(
        url=dict(type="str", required=True, fallback=(env_fallback, [URL_ENV])),
        token=dict(type="str", no_log=True, fallback=(env_fallback, [TOKEN_ENV])),
        validate_certs=dict(type="bool", default=True),
        timeout=dict(type="int", default=30),
    )


class LabClientError(Exception):
    """An HTTP error answer (status set) or an unreachable bastion (status None)."""

    def __init__(self, message, status=None, error=None, detail=None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.detail = detail


class LabClient:
    """JSON over HTTP to one bastion. Operator endpoints get ``Authorization: Bearer <token>``."""

    def __init__(self, url, token=None, timeout=30, validate_certs=True, ca_path=None):
        if not url or not (url.startswith("http://") or url.startswith("https://")):
            raise LabClientError("bastion URL must start with http:// or https://, not %r" % (url,))
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.validate_certs = validate_certs
        self.ca_path = ca_path  # a CA certificate file to verify TLS with (labd's own CA)

    def request(self, method, path, body=None, query=None):
        """Send one request; return the decoded JSON answer (a dict) or raise LabClientError."""
        url = self.url + path
        items = sorted((k, v) for k, v in (query or {}).items() if v is not None)
        if items:
            url += "?" + urlencode(items)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            resp = open_url(url, data=data, headers=headers, method=method, timeout=self.timeout,
                            validate_certs=self.validate_certs, http_agent=USER_AGENT, follow_redirects="safe",
                            ca_path=self.ca_path)
            raw = resp.read()
        except HTTPError as exc:
            raise self._http_error(method, url, exc)
        except (URLError, OSError, ValueError) as exc:
            raise LabClientError("cannot reach %s: %s" % (self.url, getattr(exc, "reason", exc)))
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise LabClientError("%s %s: the answer is not JSON (is %s a lab bastion?)" % (method, path, self.url))

    @staticmethod
    def _http_error(method, url, exc):
        error, detail = exc.reason, None
        try:
            doc = json.loads(exc.read() or b"{}")
            error, detail = doc.get("error", error), doc.get("detail")
        except (ValueError, AttributeError, OSError):
            pass
        hint = ""
        if exc.code == 401 and "/api/v1/" in url:
            hint = " (set labd_token or LAB_LABD_TOKEN to an API token of labd: `labctl login`, `labctl create token`)"
        elif exc.code == 401:
            hint = " (set token or %s to the output of `lab-bastion token`)" % TOKEN_ENV
        msg = "%s %s: HTTP %s %s%s%s" % (method, url, exc.code, error, ": %s" % (detail,) if detail else "", hint)
        return LabClientError(msg, status=exc.code, error=error, detail=detail)

    # -- the API, one method per endpoint used by the plugins ---------------------------------
    def pages(self, path, key, page_size=1000, **filters):
        """Every item of a paged list (``{key: [...], "next": cursor}``, the bastion's and labd's
        shape): one request per page of ``page_size``, following ``next``."""
        items, cursor = [], None
        while True:
            query = dict(filters, limit=page_size, cursor=cursor)
            doc = self.request("GET", path, query=query)
            page = doc.get(key) if isinstance(doc, dict) else None
            if not isinstance(page, list):
                raise LabClientError("GET %s%s: answer has no %r list" % (self.url, path, key))
            items.extend(page)
            cursor = doc.get("next")
            if not cursor or not page:
                return items

    def machines(self, page_size=1000, **filters):
        """All machines of a bastion (``GET /api/machines``, one request per page of ``page_size``:
        one for fleets of up to 1000), optionally filtered by state/role/os."""
        return self.pages("/api/machines", "machines", page_size, **filters)

    def servers(self, page_size=1000, **filters):
        """All servers of a labd (``GET /api/v1/servers``, one request per page), each a bastion's
        machine view plus ``id``, ``bastion``, ``cloud``, ``environment`` and ``labels``."""
        return self.pages("/api/v1/servers", "servers", page_size, **filters)

    def machine(self, mac):
        """One machine with its events, or None when the bastion does not know it."""
        try:
            return self.request("GET", "/api/machines/" + quote(mac, safe=""))
        except LabClientError as exc:
            if exc.status == 404:
                return None
            raise

    def install(self, mac, params):
        return self.request("POST", "/api/install", dict(params, mac=mac))

    def reprovision(self, mac, overrides, reason=""):
        return self.request("POST", "/api/machines/%s/reprovision" % quote(mac, safe=""), dict(overrides, reason=reason))

    def cancel(self, mac, reason=""):
        return self.request("POST", "/api/machines/%s/cancel" % quote(mac, safe=""), {"reason": reason} if reason else None)

    def debug(self, mac, mode):
        return self.request("POST", "/api/debug", {"mac": mac, "mode": mode})

    def forget(self, mac):
        return self.request("DELETE", "/api/machines/" + quote(mac, safe=""))

    def bmc(self, mac):
        """The machine's BMC record (never its credentials), or None when it has none."""
        try:
            return self.request("GET", "/api/machines/%s/bmc" % quote(mac, safe=""))
        except LabClientError as exc:
            if exc.status == 404:
                return None
            raise

    def set_bmc(self, mac, record):
        return self.request("PUT", "/api/machines/%s/bmc" % quote(mac, safe=""), record)

    def power(self, mac, action=None, boot=None):
        """The power state through the machine's BMC (action None), or on/off/cycle after setting
        the next boot device (boot: network or disk)."""
        path = "/api/machines/%s/power" % quote(mac, safe="")
        if action is None:
            return self.request("GET", path)
        body = {"action": action}
        if boot:
            body["boot"] = boot
        return self.request("POST", path, body)


def client_from_module(module):
    """A LabClient from a module's connection options; a bad URL fails the module."""
    p = module.params
    try:
        return LabClient(p["url"], p.get("token"), p.get("timeout") or 30, p.get("validate_certs", True))
    except LabClientError as exc:
        module.fail_json(msg=str(exc))
