"""The web console through Flask's test client: login, session cookie, CSRF, headers, escaping of
what machines report, the install form's validation messages, actions, live fragments (ETag/304).
The browser test is tests/integration/test_console_browser.py."""

from __future__ import annotations

import re
import stat

import pytest

from tests.support import HW, KEY, MAC, queue_install

HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def _csrf(client, path="/console/login") -> str:
    text = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf" value="([^"]+)"', text).group(1)


@pytest.fixture
def console(client, app):
    """A logged-in test client; ``console.csrf`` is its session's CSRF token."""
    r = client.post("/console/login", data={"csrf": _csrf(client), "token": app.config["LAB_TOKEN"]})
    assert r.status_code == 302 and r.headers["Location"].endswith("/console/machines")
    client.csrf = _csrf(client, "/console/machines")
    return client


def test_pages_need_a_login_and_the_live_parts_answer_401(client):
    r = client.get("/console/machines?state=installed")
    assert r.status_code == 302 and "/console/login?next=" in r.headers["Location"]
    assert client.get("/console/machines/live").status_code == 401
    assert client.get(f"/console/machines/{MAC}/follow").status_code == 401


def test_login_sets_a_strict_httponly_session_cookie_and_the_key_is_0600(client, app, data_dir):
    r = client.post("/console/login", data={"csrf": _csrf(client), "token": app.config["LAB_TOKEN"],
                                            "next": "/console/machines?state=failed"})
    assert r.status_code == 302 and r.headers["Location"] == "/console/machines?state=failed"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; tests/unit checks the TLS case below
    assert stat.S_IMODE((data_dir / "console-session.key").stat().st_mode) == 0o600
    assert client.get("/console/machines").status_code == 200


def test_secure_cookie_over_tls(client, app):
    page = client.get("/console/login", base_url="https://bastion.test").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/console/login", data={"csrf": csrf, "token": app.config["LAB_TOKEN"]},
                    base_url="https://bastion.test")
    assert r.status_code == 302
    assert "Secure" in r.headers["Set-Cookie"]


def test_wrong_token_is_refused(client):
    r = client.post("/console/login", data={"csrf": _csrf(client), "token": "not-the-token-at-all"})
    assert r.status_code == 401 and "not this bastion" in r.get_data(as_text=True)
    assert client.get("/console/machines").status_code == 302


def test_a_foreign_next_is_not_followed(client, app):
    r = client.post("/console/login", data={"csrf": _csrf(client), "token": app.config["LAB_TOKEN"],
                                            "next": "//evil.example/console/"})
    assert r.headers["Location"] == "/console/machines"


def test_a_new_operator_token_ends_the_session(console, app):
    app.config["LAB_TOKEN"] = "another-operator-token-0123456789"
    assert console.get("/console/machines").status_code == 302


def test_posts_without_or_with_a_wrong_csrf_token_are_refused_and_change_nothing(console, client, app):
    client.post("/api/discover", json={"mac": MAC})
    for data in ({"reason": "x"}, {"reason": "x", "csrf": "forged"}):
        r = console.post(f"/console/machines/{MAC}/forget", data=data)
        assert r.status_code == 403 and "CSRF" in r.get_data(as_text=True)
    assert app.extensions["lab_store"].get(MAC) is not None
    # the login form too: no login without the session's token
    fresh = app.test_client()
    r = fresh.post("/console/login", data={"token": app.config["LAB_TOKEN"]})
    assert r.status_code == 403


def test_security_headers(console):
    for path in ("/console/machines", "/console/login", "/console/static/console.js"):
        r = console.get(path)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
    page = console.get("/console/machines").get_data(as_text=True)
    assert "<script>" not in page and " style=" not in page and " on" + "click" not in page  # nothing inline
    assert console.get("/console/machines").headers["Cache-Control"] == "no-store"


def test_what_a_machine_reports_is_text_never_markup(console, client):
    hw = {**HW, "dmi": {"vendor": HOSTILE, "product": "p", "serial": "s"}}
    assert client.post("/api/discover", json={"mac": MAC, "hardware": hw, "x_note": HOSTILE}).status_code == 200
    for path in (f"/console/machines/{MAC}", f"/console/machines/{MAC}/live"):
        text = console.get(path).get_data(as_text=True)
        assert "<script>alert(1)" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_machines_list_filters_sorts_counts_and_pages(console, client):
    for i in range(12):
        client.post("/api/discover", json={"mac": f"52:54:00:00:00:{i:02x}"})
    text = console.get("/console/machines?per=10").get_data(as_text=True)
    assert "12 machines, page 1 of 2" in text and 'id="count-discovered">12<' in text and 'rel="next"' in text
    text = console.get("/console/machines?per=10&page=2&sort=mac&dir=desc").get_data(as_text=True)
    assert text.index("52:54:00:00:00:01") < text.index("52:54:00:00:00:00")
    assert 'aria-sort="descending"' in text
    assert "No machines match" in console.get("/console/machines?state=installed").get_data(as_text=True)


def test_live_fragment_answers_304_until_something_changes(console, client):
    r = console.get("/console/machines/live")
    etag = r.headers["ETag"]
    assert r.status_code == 200 and "<html" not in r.get_data(as_text=True)
    assert console.get("/console/machines/live", headers={"If-None-Match": etag}).status_code == 304
    client.post("/api/discover", json={"mac": MAC})
    r = console.get("/console/machines/live", headers={"If-None-Match": etag})
    assert r.status_code == 200 and MAC in r.get_data(as_text=True)
    r = console.get(f"/console/machines/{MAC}/live")
    assert console.get(f"/console/machines/{MAC}/live", headers={"If-None-Match": r.headers["ETag"]}).status_code == 304


def test_install_form_shows_the_api_messages_next_to_the_fields(console, client, auth):
    client.post("/api/discover", json={"mac": MAC})
    form = {"csrf": console.csrf, "hostname": "-bad-", "role": "", "os": "fedora-43", "disk": "sda",
            "ssh_keys": f"{KEY}\nnot a key"}
    r = console.post(f"/console/machines/{MAC}/install", data=form)
    text = r.get_data(as_text=True)
    assert r.status_code == 422
    # the very messages the JSON API gives for the same values
    api = client.post("/api/install", headers=auth, json={"mac": MAC, "hostname": "-bad-", "role": "", "os": "fedora-43",
                                                          "disk": "sda", "ssh_keys": [KEY, "not a key"]}).json["detail"]
    for e in api:
        field, _, index = e["field"].partition(".")
        assert f'id="{field}-error">' in text
        from markupsafe import escape

        assert str(escape(e["message"])) in text, e
    assert 'aria-describedby="hostname-error"' in text


def test_install_then_cancel_then_forget(console, client, app):
    client.post("/api/discover", json={"mac": MAC})
    form = {"csrf": console.csrf, "hostname": "node1", "role": "worker", "os": "fedora-43", "disk": "", "ssh_keys": KEY}
    r = console.post(f"/console/machines/{MAC}/install", data=form)
    assert r.status_code == 302
    store = app.extensions["lab_store"]
    m = store.get(MAC)
    assert m["state"] == "install_queued" and m["hostname"] == "node1" and m["ssh_keys"] == [KEY]
    assert store.events(MAC)[-1]["actor"].startswith("console:operator@")
    assert "Cancel the install of node1?" in console.get(f"/console/machines/{MAC}/cancel").get_data(as_text=True)
    assert console.post(f"/console/machines/{MAC}/cancel", data={"csrf": console.csrf}).status_code == 302
    assert store.get(MAC)["state"] == "discovered"
    r = console.post(f"/console/machines/{MAC}/forget", data={"csrf": console.csrf, "reason": "gone"})
    assert r.status_code == 302 and store.get(MAC) is None
    assert console.get(f"/console/machines/{MAC}").status_code == 404


def test_a_refused_change_says_why(console, client):
    client.post("/api/discover", json={"mac": MAC})
    r = console.post(f"/console/machines/{MAC}/cancel", data={"csrf": console.csrf})
    assert r.status_code == 409 and "cancel" in r.get_data(as_text=True)


def test_reinstall_of_an_installed_machine_and_debug(console, client, auth, app):
    token = queue_install(client, auth, mac=MAC, hostname="node9")
    client.post("/api/progress", json={"mac": MAC, "token": token, "stage": "complete", "percent": 100})
    store = app.extensions["lab_store"]
    assert store.get(MAC)["state"] == "installed"
    page = console.get(f"/console/machines/{MAC}/install").get_data(as_text=True)
    assert "Queue reinstall" in page and 'value="node9"' in page
    r = console.post(f"/console/machines/{MAC}/install", data={"csrf": console.csrf, "hostname": "node9", "role": "worker",
                                                              "os": "fedora-43", "disk": "", "ssh_keys": KEY, "reason": "new disk"})
    assert r.status_code == 302 and store.get(MAC)["state"] == "install_queued"
    assert store.events(MAC)[-1]["reason"].startswith("new disk")
    r = console.post(f"/console/machines/{MAC}/debug", data={"csrf": console.csrf, "mode": "pxe"})
    assert r.status_code == 302 and store.get(MAC)["debug_mode"] == "pxe"
    assert console.post(f"/console/machines/{MAC}/debug", data={"csrf": console.csrf, "mode": "bogus"}).status_code == 422


def test_logout(console):
    assert console.post("/console/logout", data={"csrf": console.csrf}).status_code == 302
    assert console.get("/console/machines").status_code == 302


def test_every_console_route_needs_a_login(app, client):
    """Enumerated from the app's routes, so a page added later is covered too."""
    client.post("/api/discover", json={"mac": MAC})
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("console.") or rule.endpoint in ("console.login", "console.static"):
            continue
        for action in ("cancel", "forget", "debug") if "action" in rule.arguments else (None,):
            path = rule.rule.replace("<mac>", MAC).replace("<any(cancel, forget, debug):action>", action or "")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                r = client.open(path, method=method, data={"reason": "x"})
                assert r.status_code in (302, 401) and "/login" in r.headers.get("Location", "/login"), (method, path)
                checked += 1
    assert checked >= 10
    assert [e["kind"] for e in app.extensions["lab_store"].events(MAC)] == ["discover"]
