"""labd's web console against a real `labd serve` (HTTPS, PostgreSQL): user login, the fleet pages,
the audit log (who did what), RBAC applied by the API (a viewer sees no delete button and gets 403
when it posts anyway), CSRF, escaping and the headers."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.support import save_screenshot, start_chromium, wait_for


def _csrf(text: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', text).group(1)


def console_as(labd, user: str, password: str):
    """A requests session logged in to labd's console through its form; (session, page text)."""
    s = labd.session()
    csrf = _csrf(s.get(labd.url + "/console/login").text)
    r = s.post(labd.url + "/console/login", data={"csrf": csrf, "username": user, "password": password})
    return s, r


@pytest.fixture(scope="module")
def world(labd, admin):
    """A server in lab1/prod and a viewer user."""
    api = labd.url + "/api/v1"
    mac = "52:54:03:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3])
    server = admin.post(api + "/servers", json={"mac": mac, "cloud": "lab1", "environment": "prod",
                                                "hostname": f"web-{uuid.uuid4().hex[:6]}", "labels": {"rack": "r1"}})
    assert server.status_code == 201, server.text
    name = f"view-{uuid.uuid4().hex[:6]}"
    assert admin.post(api + "/users", json={"name": name, "password": "correct horse battery"}).status_code == 201
    assert admin.post(api + "/rolebindings", json={"user": name, "role": "viewer"}).status_code == 201
    return {"server": server.json(), "viewer": name}


def test_login_pages_and_headers(labd, world):
    s = labd.session()
    r = s.get(labd.url + "/console/servers", allow_redirects=False)
    assert r.status_code == 302 and "/console/login" in r.headers["Location"]
    s, r = console_as(labd, "admin", "wrong password here")
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    s, r = console_as(labd, "admin", labd.admin_password)
    assert r.status_code == 200 and r.url.endswith("/console/servers") and "<title>Servers · labd</title>" in r.text
    assert world["server"]["hostname"] in r.text and "rack=r1" in r.text and "Delete…" in r.text
    cookie = next(c for c in s.cookies if c.name == "lab_console")
    assert cookie.secure and cookie.has_nonstandard_attr("HttpOnly")  # labd is HTTPS: Secure
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and r.headers["X-Frame-Options"] == "DENY"
    for kind in ("bastions", "agents", "clusters", "audit"):
        assert s.get(f"{labd.url}/console/{kind}").status_code == 200, kind


def test_audit_log_shows_who_did_what_as_text(labd, world):
    console_as(labd, "<script>alert(1)</script>", "not a password at all")  # audited as a denied login
    s, _ = console_as(labd, "admin", labd.admin_password)
    text = s.get(labd.url + "/console/audit").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert(1)" not in text
    assert f"<td>admin</td><td>servers.create</td><td>servers/{world['server']['id']}</td>" in text
    only = s.get(labd.url + "/console/audit", params={"actor": "admin", "action": "login"}).text
    assert "<td>login</td>" in only and "alert(1)" not in only


def test_a_viewer_sees_no_delete_and_gets_403_when_posting_anyway(labd, world, admin):
    s, r = console_as(labd, world["viewer"], "correct horse battery")
    assert r.status_code == 200 and world["server"]["hostname"] in r.text and "Delete…" not in r.text
    sid = world["server"]["id"]
    page = s.get(f"{labd.url}/console/servers/{sid}/delete")
    r = s.post(f"{labd.url}/console/servers/{sid}/delete", data={"csrf": _csrf(page.text)})
    assert r.status_code == 403 and "may not delete servers" in r.text
    assert admin.get(f"{labd.url}/api/v1/servers/{sid}").status_code == 200
    assert s.get(labd.url + "/console/audit").status_code == 403  # a viewer may not read the audit log


def test_lists_update_through_a_conditional_poll(labd, admin):
    s, _ = console_as(labd, "admin", labd.admin_password)
    cloud = f"c{uuid.uuid4().hex[:6]}"  # a cloud of this test alone: other tests share the database
    r = s.get(labd.url + "/console/bastions", params={"live": "1", "cloud": cloud})
    assert r.status_code == 200 and "<html" not in r.text and "None match" in r.text
    assert s.get(labd.url + "/console/bastions", params={"live": "1", "cloud": cloud},
                 headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    name = f"b-{uuid.uuid4().hex[:6]}"
    assert admin.post(labd.url + "/api/v1/bastions", json={"name": name, "cloud": cloud, "environment": "e"}).status_code == 201
    r = s.get(labd.url + "/console/bastions", params={"live": "1", "cloud": cloud}, headers={"If-None-Match": r.headers["ETag"]})
    assert r.status_code == 200 and name in r.text
    assert labd.session().get(labd.url + "/console/bastions?live=1", allow_redirects=False).status_code == 401


def test_delete_needs_csrf_then_works_for_the_admin(labd, world, admin):
    s, _ = console_as(labd, "admin", labd.admin_password)
    sid = world["server"]["id"]
    assert s.post(f"{labd.url}/console/servers/{sid}/delete", data={}).status_code == 403
    assert admin.get(f"{labd.url}/api/v1/servers/{sid}").status_code == 200
    page = s.get(f"{labd.url}/console/servers/{sid}/delete")
    r = s.post(f"{labd.url}/console/servers/{sid}/delete", data={"csrf": _csrf(page.text)})
    assert r.status_code == 200 and "deleted" in r.text
    assert admin.get(f"{labd.url}/api/v1/servers/{sid}").status_code == 404
    # logging out revokes the session's API token
    s.post(labd.url + "/console/logout", data={"csrf": _csrf(s.get(labd.url + "/console/servers").text)})
    assert s.get(labd.url + "/console/servers", allow_redirects=False).status_code == 302


def test_in_a_browser_with_screenshots(labd, world, admin, tmp_path):
    """Chromium logs in through the form and sees the pages (the screenshots in docs/console.md)."""
    from selenium.webdriver.common.by import By

    api = labd.url + "/api/v1"
    host = f"db-{uuid.uuid4().hex[:6]}"
    for kind, body in (("servers", {"mac": "52:54:03:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3]),
                                    "cloud": "lab1", "environment": "prod", "hostname": host, "role": "worker",
                                    "os": "debian-12", "labels": {"rack": "r2"}}),
                       ("bastions", {"name": f"b-{uuid.uuid4().hex[:6]}", "cloud": "lab1", "environment": "prod"}),
                       ("clusters", {"name": f"k-{uuid.uuid4().hex[:6]}", "cloud": "lab1", "environment": "prod"})):
        assert admin.post(f"{api}/{kind}", json=body).status_code == 201
    driver = start_chromium()
    try:
        driver.get(labd.url + "/console/")
        driver.find_element(By.ID, "username").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(labd.admin_password)
        driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
        wait_for(lambda: driver.current_url.endswith("/console/servers"), timeout=20, what="the servers page")
        assert host in driver.find_element(By.TAG_NAME, "tbody").text
        save_screenshot(driver, tmp_path / "console-labd-servers.png")
        driver.get(labd.url + "/console/bastions")
        assert "never" in driver.find_element(By.TAG_NAME, "tbody").text  # the lag of a bastion never seen
        driver.get(labd.url + "/console/audit")
        assert "servers.create" in driver.find_element(By.TAG_NAME, "tbody").text
        save_screenshot(driver, tmp_path / "console-labd-audit.png")
    finally:
        driver.quit()
