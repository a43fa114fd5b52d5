"""THE HTTP client of labctl: requests, bearer token, timeouts, HTTP errors mapped to exit codes.

Every command talks to the bastion (or to labd) through :class:`Client`; nothing else in labctl
opens a URL. A labd client (``labd=True``) verifies TLS with the CA pinned at `labctl login`
(``verify=<pem file>``) and words its errors for labd.
"""

from __future__ import annotations

import json as json_lib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from labctl import errors

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: a BMC call: the bastion tries twice with 3 s to connect and 8 s to read (bastion_app.power)
POWER_READ_TIMEOUT = 60.0


class Client:
    def __init__(self, base_url: str, token: str = "", timeout: float = READ_TIMEOUT, *,
                 labd: bool = False, verify: bool | str = True):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.labd = labd
        self.what = "labd" if labd else "the bastion"
        # per request, not session.verify: requests lets REQUESTS_CA_BUNDLE override a session's setting
        self.verify = verify
        self.session = requests.Session()
        # a kept-alive connection the server closed meanwhile is retried for reads only (GET);
        # nothing that changes state is ever sent twice
        retry = Retry(total=2, connect=2, read=1, status=0, other=0, allowed_methods=frozenset({"GET"}),
                      backoff_factor=0.2, raise_on_status=False)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retry))
        self.session.headers["User-Agent"] = "labctl"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # -- plumbing ----------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                stream: bool = False, headers: dict | None = None, read_timeout: float | None = None,
                ok: tuple[int, ...] = ()) -> requests.Response:
        """Send one request; any answer that is not 2xx (or listed in ``ok``) raises a LabctlError."""
        try:
            resp = self.session.request(method, self.url(path), json=json, params=params, stream=stream, verify=self.verify,
                                        headers=headers, timeout=(CONNECT_TIMEOUT, read_timeout or self.timeout))
        except requests.Timeout:
            raise errors.Unreachable(f"{self.what} at {self.base_url} did not answer in time",
                                     "check that it is running and reachable (labctl doctor)") from None
        except requests.exceptions.SSLError as exc:
            raise errors.Unreachable(f"{self.what} at {self.base_url} failed TLS verification: {exc}",
                                     "its certificate is not signed by the CA pinned at `labctl login`; if labd "
                                     "was re-initialised on purpose, log in again with --ca-fingerprint") from None
        except requests.ConnectionError:
            raise errors.Unreachable(f"cannot reach {self.what} at {self.base_url}",
                                     "is `labd serve` running? Check labdUrl (labctl config list)" if self.labd else
                                     "is `lab-bastion serve` running? Set the URL with --bastion, "
                                     "LABCTL_BASTION_URL or `labctl config set bastionUrl URL`") from None
        if resp.status_code < 400 or resp.status_code in ok:
            return resp
        raise self.error(resp)

    def not_a_bastion(self, resp: requests.Response, what: str) -> errors.LabctlError:
        """The answer is not one a lab-platform bastion gives (HTML, another API, a proxy's page)."""
        ctype = resp.headers.get("Content-Type", "no content type").split(";")[0]
        return errors.Unreachable(
            f"{self.base_url} is not a lab-platform {'labd' if self.labd else 'bastion'}: {resp.request.method} "
            f"{resp.request.path_url} answered {resp.status_code} {resp.reason or ''} with {what} ({ctype})".replace("  ", " "),
            "check the URL: labctl config get labdUrl (or --context, LABCTL_LABD_URL)" if self.labd else
            "check the URL: labctl config get bastionUrl (or --bastion, --context, LABCTL_BASTION_URL); "
            "a bastion answers GET /healthz with JSON")

    def error(self, resp: requests.Response) -> errors.LabctlError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:  # every error of bastion and labd is {"error", "detail"}
            return self.not_a_bastion(resp, f"something other than {self.what}'s JSON error")
        return self.answer_error(resp.status_code, body, f"{resp.request.method} {resp.request.path_url}", resp.reason)

    def answer_error(self, code: int, body: dict, where: str, reason: str = "") -> errors.LabctlError:
        """The error (and exit code) of an HTTP error answer ``{"error", "detail"}``: this API's own,
        or a bastion's that labd relays (a routed command's result)."""
        msg, detail = str(body.get("error") or reason), body.get("detail")
        if code in (401, 403) and self.labd:
            return errors.Unauthorized(f"labd refused the request ({code} {msg}{_detail(detail)}) for {where}",
                                       "log in again: labctl login URL" if code == 401 else
                                       "your roles do not allow it: labctl get rolebindings (ask an admin)")
        if code in (401, 403):
            return errors.Unauthorized(
                f"the bastion refused the token ({code} {msg}) for {where}",
                "set the operator token: labctl config set token \"$(lab-bastion token --data-dir DIR)\" "
                "(or LABCTL_TOKEN / --token)")
        if code == 404:
            return errors.NotFound(f"{msg} ({where})", "labctl get servers lists what labd knows" if self.labd
                                   else "labctl get machines lists what the bastion knows")
        if code == 409:
            return errors.Conflict(f"{msg}{_detail(detail)}" if self.labd else msg,
                                   None if self.labd else "labctl describe machine NAME shows its state and history")
        if code in (400, 413, 422):
            return errors.UsageError(f"{self.what} rejected the request: {msg}{_detail(detail)}")
        if code == 503 and self.labd:  # a bastion offline (routed commands), or labd's database down
            return errors.Unreachable(f"{msg}{_detail(detail)}", "labctl get bastions shows which are online")
        return errors.LabctlError(f"{self.what} failed ({code} {msg}) on {where}",
                                  f"this is a {'labd' if self.labd else 'bastion'} bug: see its log")

    # -- API ---------------------------------------------------------------------------------
    def get(self, path: str, **params) -> Any:
        return self._json(self.request("GET", path, params={k: v for k, v in params.items() if v is not None}))

    def post(self, path: str, body: Any = None) -> Any:
        resp = self.request("POST", path, json=body)
        return self._json(resp) if resp.content else {}

    def put(self, path: str, body: Any = None) -> Any:
        return self._json(self.request("PUT", path, json=body))

    def delete(self, path: str) -> Any:
        resp = self.request("DELETE", path)
        return self._json(resp) if resp.content else {}

    def text(self, path: str) -> str:
        """A text/plain answer (labd's CA certificate, a kubeconfig)."""
        return self.request("GET", path).text

    def power_batch(self, body: dict) -> Iterator[dict[str, Any]]:
        """POST /api/power: the bastion runs the machines' BMC calls (its cap, its stagger) and
        answers one JSON line per machine as each ends, then the summary; yields them as they come."""
        resp = self.request("POST", "/api/power", json=body, stream=True,
                            read_timeout=POWER_READ_TIMEOUT + body.get("stagger", 0))
        with resp:
            for line in resp.iter_lines(chunk_size=None):
                if line:
                    try:
                        yield json_lib.loads(line)
                    except ValueError:
                        raise self.not_a_bastion(resp, "a line that is not JSON") from None

    def _json(self, resp: requests.Response, key: str | None = None) -> Any:
        """The answer's JSON; with ``key``, that list in it (else the answer is not a bastion's)."""
        try:
            doc = resp.json()
        except ValueError:
            raise self.not_a_bastion(resp, "something that is not JSON") from None
        if key is not None:
            if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
                raise self.not_a_bastion(resp, f"JSON without the {key!r} list")
            return doc[key]
        return doc

    def get_list(self, path: str, key: str, **params) -> list[dict[str, Any]]:
        return self._json(self.request("GET", path, params={k: v for k, v in params.items() if v is not None}), key)

    def pages(self, path: str, key: str, page_size: int = 1000, **filters) -> list[dict[str, Any]]:
        """Every item of a paged list (``{key: [...], "next": cursor}``, the bastion's and labd's
        shape), following ``next``. A filter value may be a list (a repeated query parameter)."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            resp = self.request("GET", path, params={k: v for k, v in
                                                     {"limit": page_size, "cursor": cursor, **filters}.items()
                                                     if v is not None})
            page = self._json(resp, key)
            out += page
            cursor = resp.json().get("next")
            if not cursor or not page:
                return out

    def machines(self, page_size: int = 1000, **filters) -> list[dict[str, Any]]:
        """Every machine (matching ``filters``), following the pages of GET /api/machines."""
        return self.pages("/api/machines", "machines", page_size, **filters)

    def machine(self, mac: str) -> dict[str, Any]:
        return self.get(f"/api/machines/{quote(mac)}")

    def events(self, since: int = 0, mac: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        return self.get_list("/api/events", "events", since=since, mac=mac, limit=limit)

    def last_event_id(self) -> int:
        """The id of the newest event (a cursor for watching)."""
        since = 0
        while True:
            batch = self.events(since=since, limit=5000)
            if not batch:
                return since
            since = batch[-1]["id"]

    def stream(self, path: str, *, last_event_id: str | None = None, idle_timeout: float = 60.0,
               params: dict | None = None) -> requests.Response:
        """Open a Server-Sent Events stream; reading raises requests' timeout after idle_timeout
        seconds with no byte (heartbeats included)."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return self.request("GET", path, stream=True, headers=headers, read_timeout=idle_timeout, params=params)


def _detail(detail: Any) -> str:
    if isinstance(detail, list):
        parts = [f"{d.get('field')}: {d.get('message')}" if isinstance(d, dict) else str(d) for d in detail]
        return " (" + "; ".join(parts) + ")"
    if detail:
        return f" ({detail})"
    return ""


def iter_sse(resp: requests.Response) -> Iterator[dict[str, str]]:
    """Parse a text/event-stream into {"event", "data", "id"} dicts (comments are yielded as
    {"event": "heartbeat"} so callers can tell the stream is alive)."""
    event: dict[str, Any] = {}
    data: list[str] = []
    resp.encoding = resp.encoding or "utf-8"
    for raw in resp.iter_lines(decode_unicode=True, chunk_size=None):
        line = raw if raw is not None else ""
        if line == "":
            if data or event:
                yield {"event": event.get("event", "message"), "data": "\n".join(data), "id": event.get("id", "")}
            event, data = {}, []
            continue
        if line.startswith(":"):
            yield {"event": "heartbeat", "data": line[1:].strip(), "id": ""}
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            event[name] = value
    if data:
        yield {"event": event.get("event", "message"), "data": "\n".join(data), "id": event.get("id", "")}
